"""Every reason code tracegate can emit is in docs/reasons.md, and the table lists none it
no longer emits (issue 21, item 3).

The reasons are collected statically, by walking the syntax trees of ``proxy/``: every
string that reaches a place where a reason is made. Those places are found, not listed:

* a call to any function, method or class of ``proxy/`` whose parameter (or dataclass /
  named-tuple field) is called ``reason`` — ``Refused(...)``, ``AuthError(...)``,
  ``BodyError(...)``, ``UpstreamError(...)``, ``Skip(...)``, ``GrpcAnswer(...)``,
  ``refusal(...)``, ``Admitted.record(...)``, ``refuse(...)``, a webhook's ``done(...)``
  — and any call with a ``reason=`` keyword (``runtime.audit(...)``, ``_answer(...)``);
* a dict display with a ``"reason"`` key (webhook and readiness answers), and a JSON text
  constant with one (the guard's 500);
* a protocol error's kind: the label of ``metrics.child(metrics.protocol_errors, KIND)``;
* and, by propagation, any parameter the value at one of those places comes from: a
  helper ``def _stop(self, why, kind)`` that passes ``kind`` on becomes a place too, and
  its callers' arguments (and the parameter's default) are collected.

A value is followed through constants (module-level, imported, or local), conditional
expressions, ``or``, tuples and their unpacking (``status, decision, reason, _ = found``,
``for cls, kind in _KINDS``), ``*args``, dict ``.get``, a called function's return values
and ``Literal[...]`` return type, ``await``, and ``self.attr`` assignments in the class.
An f-string or ``+`` with a value known only at run time is a pattern
(``f"upstream-{status}"`` is ``upstream-*``), which the table writes ``upstream-<status>``.
A value read from an object is made where the object was: ``attempt.result``, where
``attempt`` is an ``Outcome`` (by its annotation, the call that returned it, or its
``except`` clause), makes ``Outcome``'s ``result`` a place too.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).parent.parent
TABLE = ROOT / "docs" / "reasons.md"

# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tup:
    """A tuple or list display: each position's possible values."""

    items: tuple[frozenset[Val], ...]


@dataclass(frozen=True)
class DictV:
    """A dict display: its values' possible values."""

    values: frozenset[Val]


Val = str | Tup | DictV
PATTERN = "*"  # stands for a part known only at run time


def _strings(values: Iterable[Val]) -> set[str]:
    return {v for v in values if isinstance(v, str)}


# --- the scanner -------------------------------------------------------------------------

Scope = ast.FunctionDef | ast.AsyncFunctionDef
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    #: local name → ("module", "proxy.x") or ("name", "proxy.x", "attr")
    imports: dict[str, tuple[str, ...]] = field(default_factory=dict)
    defs: dict[str, ast.AST] = field(default_factory=dict)


@dataclass
class Found:
    """Where each reason (or protocol-error kind) was seen to be made."""

    sites: dict[str, set[str]] = field(default_factory=dict)

    def add(self, values: Iterable[Val], where: str) -> None:
        for value in _strings(values):
            self.sites.setdefault(value, set()).add(where)


class Scanner:
    def __init__(self, root: Path, package: str) -> None:
        self.root = root
        self.package = package
        self.modules: dict[str, Module] = {}
        self.parent: dict[ast.AST, ast.AST] = {}
        self.module_of: dict[ast.AST, Module] = {}
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            tree = ast.parse(path.read_text(), str(path))
            module = Module(name, path, tree)
            self.modules[name] = module
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    self.parent[child] = node
                self.module_of[node] = module
        for module in self.modules.values():
            self._index(module)
        #: method name → the methods of that name, in every class of the package
        self.methods: dict[str, list[ast.AST]] = {}
        #: function → the functions and classes defined in it, by name
        self.nested: dict[ast.AST, dict[str, ast.AST]] = {}
        for node in self.parent:
            if isinstance(node, _FUNCS) and isinstance(self.parent[node], ast.ClassDef):
                self.methods.setdefault(node.name, []).append(node)
            if isinstance(node, (*_FUNCS, ast.ClassDef)):
                for scope in self._enclosing(node):
                    if isinstance(scope, _FUNCS):
                        self.nested.setdefault(scope, {}).setdefault(node.name, node)
        self._memo: dict[tuple[int, int], frozenset[Val]] = {}
        #: callable node → names of its parameters where a reason is made
        self.sinks: dict[ast.AST, set[str]] = {}
        self._resolving: set[tuple[int, str]] = set()
        self.changed = False
        self._seed()

    # -- indexes ------------------------------------------------------------------------

    def _index(self, module: Module) -> None:
        for node in module.tree.body:
            if isinstance(node, (*_FUNCS, ast.ClassDef)):
                module.defs[node.name] = node
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    local = alias.asname or alias.name
                    if target in self.modules or self._is_package(target):
                        module.imports[local] = ("module", target)
                    else:
                        module.imports[local] = ("name", node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        module.imports[alias.asname] = ("module", alias.name)
        # imports inside functions (``from proxy.ci.pipeline import …`` in a handler)
        for inner in ast.walk(module.tree):
            if (
                isinstance(inner, ast.ImportFrom)
                and inner.module
                and inner.level == 0
                and inner not in module.tree.body
            ):
                for alias in inner.names:
                    module.imports.setdefault(alias.asname or alias.name, ("name", inner.module, alias.name))

    def _is_package(self, name: str) -> bool:
        return (self.root / Path(*name.split("."))).is_dir()

    def _seed(self) -> None:
        for module in self.modules.values():
            for node in ast.walk(module.tree):
                if isinstance(node, _FUNCS) and "reason" in self._param_names(node):
                    self.sinks.setdefault(node, set()).add("reason")
                if isinstance(node, ast.ClassDef) and "reason" in self._fields(node):
                    self.sinks.setdefault(node, set()).add("reason")

    # -- signatures ---------------------------------------------------------------------

    @staticmethod
    def _param_names(fn: Scope) -> list[str]:
        args = fn.args
        return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]

    def _is_method(self, fn: Scope) -> bool:
        return isinstance(self.parent.get(fn), ast.ClassDef) and not any(
            isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list
        )

    def _positional(self, fn: Scope) -> list[str]:
        names = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
        return names[1:] if self._is_method(fn) else names

    def _fields(self, cls: ast.ClassDef) -> list[str]:
        """A dataclass's or named tuple's fields, in order, inherited ones first."""
        inherited: list[str] = []
        for base in cls.bases:
            for found in self._callee_defs(base, cls):
                if isinstance(found, ast.ClassDef):
                    inherited += self._fields(found)
        own = [
            s.target.id
            for s in cls.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and "ClassVar" not in ast.unparse(s)
        ]
        return inherited + [name for name in own if name not in inherited]

    def _init(self, cls: ast.ClassDef) -> Scope | None:
        for stmt in cls.body:
            if isinstance(stmt, _FUNCS) and stmt.name == "__init__":
                return stmt
        for base in cls.bases:
            for found in self._callee_defs(base, cls):
                if isinstance(found, ast.ClassDef):
                    init = self._init(found)
                    if init is not None:
                        return init
        return None

    def _sink_params(self, target: ast.AST) -> tuple[list[str], set[str], set[str]]:
        """(positional parameter names, keyword names, the names that are sinks)."""
        if isinstance(target, ast.ClassDef):
            init = self._init(target)
            if init is not None:
                return self._positional(init), set(self._param_names(init)), self.sinks.get(init, set())
            fields = self._fields(target)
            return fields, set(fields), self.sinks.get(target, set())
        assert isinstance(target, _FUNCS)
        return self._positional(target), set(self._param_names(target)), self.sinks.get(target, set())

    # -- scopes and names ---------------------------------------------------------------

    def _enclosing(self, node: ast.AST) -> list[ast.AST]:
        """The functions and classes around ``node``, innermost first."""
        out: list[ast.AST] = []
        current = self.parent.get(node)
        while current is not None:
            if isinstance(current, (*_FUNCS, ast.ClassDef)):
                out.append(current)
            current = self.parent.get(current)
        return out

    def _callee_defs(self, func: ast.expr, at: ast.AST) -> list[ast.AST]:
        """The definitions in the package a call's callee can be."""
        module = self.module_of[at]
        if isinstance(func, ast.Name):
            for scope in self._enclosing(at):
                found = self.nested.get(scope, {}).get(func.id)
                if found is not None:
                    return [found]
            return self._module_attr(module, func.id)
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Call) and ast.unparse(func.value.func) == "super":
                cls = next((s for s in self._enclosing(at) if isinstance(s, ast.ClassDef)), None)
                return self._inherited(cls, func.attr) if cls is not None else []
            if isinstance(func.value, ast.Name):
                imported = module.imports.get(func.value.id)
                if imported is not None and imported[0] == "module" and imported[1] in self.modules:
                    return self._module_attr(self.modules[imported[1]], func.attr)
            return self.methods.get(func.attr, [])
        return []

    def _inherited(self, cls: ast.ClassDef, name: str) -> list[ast.AST]:
        """``super().name`` in ``cls``: the method of its nearest base in the package."""
        for base in cls.bases:
            for found in self._callee_defs(base, cls):
                if isinstance(found, ast.ClassDef):
                    own: list[ast.AST] = [s for s in found.body if isinstance(s, _FUNCS) and s.name == name]
                    return own or self._inherited(found, name)
        return []

    def _module_attr(self, module: Module, name: str) -> list[ast.AST]:
        if name in module.defs:
            return [module.defs[name]]
        imported = module.imports.get(name)
        if imported is not None and imported[0] == "name" and imported[1] in self.modules:
            return self._module_attr(self.modules[imported[1]], imported[2])
        return []

    # -- values -------------------------------------------------------------------------

    def values(self, expr: ast.AST | None, at: ast.AST) -> frozenset[Val]:
        """The values ``expr``, evaluated where ``at`` is, can have (as far as is known)."""
        if expr is None:
            return frozenset()
        key = (id(expr), id(at))
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._values(expr, at)
        return found

    def _values(self, expr: ast.AST, at: ast.AST) -> frozenset[Val]:
        if isinstance(expr, ast.Constant):
            return frozenset({expr.value}) if isinstance(expr.value, str) else frozenset()
        if isinstance(expr, ast.JoinedStr):
            text = "".join(str(p.value) if isinstance(p, ast.Constant) else PATTERN for p in expr.values)
            return frozenset({text})
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            left = _strings(self.values(expr.left, at)) or {PATTERN}
            right = _strings(self.values(expr.right, at)) or {PATTERN}
            out = {a + b for a in left for b in right}
            return frozenset(out - {PATTERN + PATTERN})
        if isinstance(expr, ast.IfExp):
            return self.values(expr.body, at) | self.values(expr.orelse, at)
        if isinstance(expr, ast.BoolOp):
            return frozenset().union(*(self.values(v, at) for v in expr.values))
        if isinstance(expr, (ast.Await, ast.Starred, ast.NamedExpr)):
            return self.values(expr.value, at)
        if isinstance(expr, (ast.Tuple, ast.List)):
            return frozenset({Tup(tuple(self.values(e, at) for e in expr.elts))})
        if isinstance(expr, ast.Dict):
            return frozenset({DictV(frozenset().union(*(self.values(v, at) for v in expr.values)))})
        if isinstance(expr, ast.Subscript):
            return self._subscript(expr, at)
        if isinstance(expr, ast.Name):
            return self._name(expr.id, at)
        if isinstance(expr, ast.Attribute):
            return self._attribute(expr, at)
        if isinstance(expr, ast.Call):
            return self._call(expr, at)
        return frozenset()

    def _subscript(self, expr: ast.Subscript, at: ast.AST) -> frozenset[Val]:
        out: set[Val] = set()
        index = expr.slice.value if isinstance(expr.slice, ast.Constant) else None
        for value in self.values(expr.value, at):
            if isinstance(value, Tup) and isinstance(index, int) and -len(value.items) <= index < len(value.items):
                out |= value.items[index]
            elif isinstance(value, DictV):
                out |= value.values
        return frozenset(out)

    def _call(self, expr: ast.Call, at: ast.AST) -> frozenset[Val]:
        func = expr.func
        if isinstance(func, ast.Name) and func.id in ("str", "repr"):
            return frozenset({PATTERN})
        if isinstance(func, ast.Attribute) and func.attr == "get":
            out: set[Val] = set()
            for value in self.values(func.value, at):
                if isinstance(value, DictV):
                    out |= value.values
            if len(expr.args) > 1:
                out |= self.values(expr.args[1], at)
            return frozenset(out)
        out = set()
        for target in self._callee_defs(func, at):
            if isinstance(target, _FUNCS):
                out |= self._returns(target)
        return frozenset(out)

    def _returns(self, fn: Scope) -> frozenset[Val]:
        key = (id(fn), "return")
        if key in self._resolving:
            return frozenset()
        self._resolving.add(key)
        try:
            out: set[Val] = set()
            for node in self._own_nodes(fn):
                if isinstance(node, ast.Return):
                    out |= self.values(node.value, node)
            if fn.returns is not None:
                out |= self._literals(fn.returns, fn)
            return frozenset(out)
        finally:
            self._resolving.discard(key)

    def _literals(self, annotation: ast.expr, at: ast.AST, depth: int = 0) -> set[Val]:
        """The strings of ``Literal[...]`` in a type annotation (through aliases)."""
        if depth > 5:
            return set()
        out: set[Val] = set()
        for node in ast.walk(annotation):
            if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Literal"):
                out |= {
                    c.value for c in ast.walk(node.slice) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                }
            elif isinstance(node, ast.Name):
                for binding in self._global_bindings(self.module_of[at], node.id):
                    if isinstance(binding, ast.Assign):
                        out |= self._literals(binding.value, binding, depth + 1)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node is annotation:
                out |= self._literals(ast.parse(node.value, mode="eval").body, at, depth + 1)
        return out

    def _own_nodes(self, fn: ast.AST) -> Iterator[ast.AST]:
        """The nodes of a function's body, not of the functions and classes inside it."""
        stack = list(ast.iter_child_nodes(fn))
        while stack:
            node = stack.pop()
            yield node
            if not isinstance(node, (*_FUNCS, ast.ClassDef, ast.Lambda)):
                stack.extend(ast.iter_child_nodes(node))

    def _name(self, name: str, at: ast.AST) -> frozenset[Val]:
        key = (id(at), name)
        if key in self._resolving:
            return frozenset()
        self._resolving.add(key)
        try:
            for scope in self._enclosing(at):
                if not isinstance(scope, _FUNCS):
                    continue
                bound = self._bindings_in(scope, name)
                is_param = name in self._param_names(scope)
                if is_param:
                    self._propagate(scope, name)
                if bound or is_param:
                    return frozenset().union(*bound) if bound else self._default(scope, name)
            module = self.module_of[at]
            out: set[Val] = set()
            for binding in self._global_bindings(module, name):
                target = next(t.id for t in self._targets(binding) if isinstance(t, ast.Name))
                out |= self._binding_values(binding, name if target == name else target)
            return frozenset(out)
        finally:
            self._resolving.discard(key)

    def _default(self, fn: Scope, name: str) -> frozenset[Val]:
        args = fn.args
        positional = [*args.posonlyargs, *args.args]
        defaults: dict[str, ast.expr] = {}
        for arg, default in zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True):
            defaults[arg.arg] = default
        for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
            if kw_default is not None:
                defaults[arg.arg] = kw_default
        return self.values(defaults.get(name), fn)

    def _propagate(self, fn: ast.AST, name: str) -> None:
        if name not in self.sinks.setdefault(fn, set()):
            self.sinks[fn].add(name)
            self.changed = True

    def _bindings_in(self, fn: ast.AST, name: str) -> list[frozenset[Val]]:
        out = []
        for node in self._own_nodes(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.For, ast.AsyncFor, ast.NamedExpr)) and any(
                isinstance(t, ast.Name) and t.id == name for t in self._targets(node)
            ):
                out.append(self._binding_values(node, name))
        return out

    def _global_bindings(self, module: Module, name: str) -> list[ast.AST]:
        """A module-level name's assignments, in its module or the one it is imported from."""
        found = self._module_bindings(module, name)
        imported = module.imports.get(name)
        if not found and imported is not None and imported[0] == "name" and imported[1] in self.modules:
            return self._global_bindings(self.modules[imported[1]], imported[2])
        return found

    def _module_bindings(self, module: Module, name: str) -> list[ast.AST]:
        return [
            node
            for node in module.tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            and any(isinstance(t, ast.Name) and t.id == name for t in self._targets(node))
        ]

    @staticmethod
    def _targets(node: ast.AST) -> list[ast.AST]:
        roots: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            roots = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.For, ast.AsyncFor, ast.NamedExpr)):
            roots = [node.target]
        return [t for root in roots for t in ast.walk(root)]

    def _binding_values(self, node: ast.AST, name: str) -> frozenset[Val]:
        if isinstance(node, (ast.For, ast.AsyncFor)):
            elements: set[Val] = set()
            for each in self.values(node.iter, node):
                if isinstance(each, Tup):
                    elements = elements.union(*each.items)
                elif isinstance(each, DictV):
                    elements |= each.values
            return self._unpack(node.target, frozenset(elements), name)
        if isinstance(node, ast.Assign):
            value: ast.expr | None = node.value
            targets: list[ast.expr] = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)):
            value, targets = node.value, [node.target]
        else:
            return frozenset()
        out: set[Val] = set()
        for target in targets:
            if (
                isinstance(target, (ast.Tuple, ast.List))
                and isinstance(value, (ast.Tuple, ast.List))
                and len(target.elts) == len(value.elts)
            ):  # ``a, b = x, y``: only the element that binds ``name`` is evaluated
                for element, part in zip(target.elts, value.elts, strict=True):
                    if any(isinstance(t, ast.Name) and t.id == name for t in ast.walk(element)):
                        out |= self._unpack(element, self.values(part, node), name)
            else:
                out |= self._unpack(target, self.values(value, node), name)
        return frozenset(out)

    def _unpack(self, target: ast.AST, values: frozenset[Val], name: str) -> frozenset[Val]:
        if isinstance(target, ast.Name):
            return values if target.id == name else frozenset()
        if isinstance(target, (ast.Tuple, ast.List)):
            out: set[Val] = set()
            for i, element in enumerate(target.elts):
                for value in values:
                    if isinstance(value, Tup) and len(value.items) == len(target.elts):
                        out |= self._unpack(element, value.items[i], name)
                    elif isinstance(value, str):  # a sequence known by its element type only
                        out |= self._unpack(element, frozenset({value}), name)
            return frozenset(out)
        return frozenset()

    def _attribute(self, expr: ast.Attribute, at: ast.AST) -> frozenset[Val]:
        module = self.module_of[at]
        if isinstance(expr.value, ast.Name):
            imported = module.imports.get(expr.value.id)
            if imported is not None and imported[0] == "module" and imported[1] in self.modules:
                return self._name(expr.attr, self.modules[imported[1]].tree)
            if expr.value.id == "self":
                cls = next((s for s in self._enclosing(at) if isinstance(s, ast.ClassDef)), None)
                if cls is not None:
                    return self._self_attr(cls, expr.attr)
            # ``attempt.result``: the field of the object's class is where the value was made
            for cls in self._classes_of(expr.value.id, at):
                self._field_sink(cls, expr.attr)
        return frozenset()

    def _classes_of(self, name: str, at: ast.AST) -> list[ast.ClassDef]:
        """The package's classes a local name's object is of, as far as its annotation, the
        call that made it (a class, or a function's return annotation) or its ``except``
        clause say."""
        for scope in self._enclosing(at):
            if not isinstance(scope, _FUNCS):
                continue
            annotations: list[tuple[ast.expr, ast.AST]] = []
            for arg in (*scope.args.posonlyargs, *scope.args.args, *scope.args.kwonlyargs):
                if arg.arg == name and arg.annotation is not None:
                    annotations.append((arg.annotation, scope))
            bound = False
            for node in self._own_nodes(scope):
                if isinstance(node, ast.ExceptHandler) and node.name == name and node.type is not None:
                    annotations.append((node.type, node))
                    bound = True
                elif isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id == name for t in self._targets(node)
                ):
                    bound = True
                    if isinstance(node, ast.AnnAssign):
                        annotations.append((node.annotation, node))
                    whole = any(isinstance(t, ast.Name) and t.id == name for t in getattr(node, "targets", ()))
                    call = node.value.value if isinstance(node.value, ast.Await) else node.value
                    if (whole or isinstance(node, ast.AnnAssign)) and isinstance(call, ast.Call):
                        for target in self._callee_defs(call.func, node):
                            if isinstance(target, ast.ClassDef):
                                annotations.append((ast.Name(target.name), target))
                            elif isinstance(target, _FUNCS) and target.returns is not None:
                                annotations.append((target.returns, target))
            if annotations or bound:
                return [
                    found
                    for annotation, where in annotations
                    for n in ast.walk(annotation)
                    if isinstance(n, ast.Name)
                    for found in (
                        [where]
                        if isinstance(where, ast.ClassDef) and n.id == where.name
                        else self._callee_defs(n, where)
                    )
                    if isinstance(found, ast.ClassDef)
                ]
        return []

    def _field_sink(self, cls: ast.ClassDef, attr: str) -> None:
        """Make the place a class's ``attr`` is given at construction a sink."""
        init = self._init(cls)
        if init is None:
            if attr in self._fields(cls):
                self._propagate(cls, attr)
            return
        for node in ast.walk(init):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and ast.unparse(target.value) == "self"
                        and target.attr == attr
                        and node.value.id in self._param_names(init)
                    ):
                        self._propagate(init, node.value.id)

    def _self_attr(self, cls: ast.ClassDef, attr: str) -> frozenset[Val]:
        key = (id(cls), attr)
        if key in self._resolving:
            return frozenset()
        self._resolving.add(key)
        try:
            out: set[Val] = set()
            for node in ast.walk(cls):
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        for t in ast.walk(target):
                            if (
                                isinstance(t, ast.Attribute)
                                and t.attr == attr
                                and isinstance(t.value, ast.Name)
                                and t.value.id == "self"
                            ):
                                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                                    position = target.elts.index(t)
                                    out |= self.values(node.value.elts[position], node)
                                elif target is t:
                                    out |= self.values(node.value, node)
            return frozenset(out)
        finally:
            self._resolving.discard(key)

    # -- the walk -----------------------------------------------------------------------

    def scan(self) -> tuple[Found, Found]:
        """(reasons, protocol-error kinds), each with where it is made; propagated to a
        fixed point (a parameter found to carry a reason makes its callers places too)."""
        while True:
            self.changed = False
            reasons, kinds = Found(), Found()
            for module in self.modules.values():
                for node in ast.walk(module.tree):
                    where = f"{module.path.relative_to(self.root)}:{getattr(node, 'lineno', 0)}"
                    if isinstance(node, ast.Call):
                        self._scan_call(node, reasons, kinds, where)
                    elif isinstance(node, ast.Dict):
                        for key, value in zip(node.keys, node.values, strict=True):
                            if isinstance(key, ast.Constant) and key.value == "reason":
                                reasons.add(self.values(value, node), where)
                    elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                        text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
                        reasons.add(re.findall(r'"reason":\s*"([^"]+)"', text), where)
            if not self.changed:
                return reasons, kinds

    def _scan_call(self, call: ast.Call, reasons: Found, kinds: Found, where: str) -> None:
        for keyword in call.keywords:
            if keyword.arg == "reason":
                reasons.add(self.values(keyword.value, call), where)
        func = call.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "child"
            and len(call.args) >= 2
            and isinstance(call.args[0], ast.Attribute)
            and call.args[0].attr == "protocol_errors"
        ):
            kinds.add(self.values(call.args[1], call), where)
        for target in self._callee_defs(func, call):
            if not isinstance(target, (*_FUNCS, ast.ClassDef)):
                continue
            positional, keywords, sinks = self._sink_params(target)
            if not sinks:
                continue
            for keyword in call.keywords:
                if keyword.arg in sinks and keyword.arg in keywords:
                    reasons.add(self.values(keyword.value, call), where)
            for _param, values in self._positional_values(call, positional, sinks):
                reasons.add(values, where)

    def _positional_values(
        self, call: ast.Call, positional: list[str], sinks: set[str]
    ) -> Iterator[tuple[str, frozenset[Val]]]:
        """(parameter, the values passed to it) for each sink parameter given positionally.
        Only those arguments are evaluated (evaluating one makes its parameters places);
        a ``*x`` is spread by each tuple it can be, which may move the arguments after it."""
        offsets = {0}
        for arg in call.args:
            if isinstance(arg, ast.Starred):
                lengths = {len(v.items) for v in self.values(arg.value, call) if isinstance(v, Tup)}
                for value in self.values(arg.value, call):
                    if isinstance(value, Tup):
                        for offset in offsets:
                            for i, items in enumerate(value.items):
                                if offset + i < len(positional) and positional[offset + i] in sinks:
                                    yield positional[offset + i], items
                offsets = {o + n for o in offsets for n in lengths} or offsets
                continue
            for offset in offsets:
                if offset < len(positional) and positional[offset] in sinks:
                    yield positional[offset], self.values(arg, call)
            offsets = {o + 1 for o in offsets}


def scan(root: Path = ROOT, package: str = "proxy") -> dict[str, set[str]]:
    """Every reason code and protocol-error kind the package can emit → where it is made."""
    reasons, kinds = Scanner(root, package).scan()
    merged: dict[str, set[str]] = {}
    for found in (reasons, kinds):
        for code, sites in found.sites.items():
            merged.setdefault(code, set()).update(sites)
    return merged


# --- the table ---------------------------------------------------------------------------


def documented(text: str) -> dict[str, str]:
    """The codes in the first column of the tables of ``text`` → the code as written;
    a ``<placeholder>`` is a part known at run time (``upstream-<status>`` → ``upstream-*``)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| reason"):
            continue
        first = line.strip("|").split("|")[0]
        for code in re.findall(r"`([^`]+)`", first):
            out[re.sub(r"<[^>]+>", PATTERN, code)] = code
    return out


def differences(emitted: dict[str, set[str]], table: dict[str, str]) -> list[str]:
    problems = [
        f"{code!r} is emitted ({', '.join(sorted(sites))}) but docs/reasons.md does not list it"
        for code, sites in sorted(emitted.items())
        if code not in table
    ]
    problems += [
        f"docs/reasons.md lists {written!r}, which nothing in proxy/ emits any more"
        for code, written in sorted(table.items())
        if code not in emitted
    ]
    return problems


def test_every_reason_is_in_the_table_and_the_table_holds_no_other() -> None:
    emitted = scan()
    assert len(emitted) > 100  # the scanner found the codebase's reasons at all
    assert differences(emitted, documented(TABLE.read_text())) == []


# --- the scanner on a small source of its own --------------------------------------------

SYNTHETIC = {
    "errors.py": """
        from dataclasses import dataclass

        class AppError(Exception):
            def __init__(self, reason: str, status: int = 400) -> None:
                self.reason = reason

        class SubError(AppError):
            pass

        @dataclass(frozen=True)
        class Refused:
            status: int
            reason: str
            retry_after: int | None = None

        NOT_A_REASON = "just-a-constant"
        GONE = "constant-reason"
        VIA_MODULE = "via-module-attribute"
    """,
    "door.py": """
        from dataclasses import dataclass
        from typing import Literal
        from pkg.errors import GONE, AppError, Refused, SubError
        from pkg import errors

        Outcome = Literal["stored", "duplicate-body"]
        _PAIRS = ((1, "kind-from-table"), (2, "kind-two"))
        _FAILURES = {"a": (502, "from-dict-get")}

        def deny(code: str) -> Refused:
            return Refused(403, code)

        def classify(x: int) -> tuple[int, str]:
            if x:
                return 400, "returned-in-tuple"
            return 401, GONE

        def kind_of(exc: object) -> str:
            for cls, kind in _PAIRS:
                if exc is cls:
                    return kind
            return "kind-fallback"

        async def store() -> Outcome:
            ...

        @dataclass(frozen=True)
        class Attempt:
            status: int
            result: str
            note: str = ""

        def attempt_once() -> Attempt:
            return Attempt(0, "typed-field", "not-a-reason-note")

        def deliver(audit) -> None:
            attempt = attempt_once()
            status, result = attempt.status, attempt.result
            audit(kind="outbox", reason=result)

        class Conn:
            def __init__(self, metrics) -> None:
                self.metrics = metrics
                self._kind: str | None = None

            def _escape(self, kind: str | None = "kind-by-default") -> None:
                self._kind = kind

            def _stop(self, kind: str | None) -> None:
                self.metrics.child(self.metrics.protocol_errors, kind)

            def feed(self) -> None:
                self._escape()
                self._escape("kind-via-attribute")
                self._stop(self._kind)
                self._stop(kind_of(self) if self else "kind-inline")

        async def handle(request, status: int) -> object:
            ignored = "not-a-reason-either"
            if status == 1:
                raise SubError("inherited-init")
            if status == 2:
                raise AppError(f"upstream-{status}", 502)
            if status == 3:
                return deny("via-parameter")
            if status == 4:
                code, why = classify(status)
                return Refused(code, why)
            if status == 5:
                return {"accepted": False, "reason": "in-a-dict"}
            if status == 6:
                request.audit(kind=errors.NOT_A_REASON, reason="by-keyword" if status else errors.VIA_MODULE)
            if status == 7:
                return Refused(*_FAILURES.get("a"))
            stored = await store()
            return b'{"reason": "in-json-text"}', Refused(202, stored), ignored
    """,
}


def synthetic(tmp_path: Path, extra: str = "") -> dict[str, set[str]]:
    package = tmp_path / "pkg"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    for name, text in SYNTHETIC.items():
        (package / name).write_text(textwrap.dedent(text) + textwrap.dedent(extra if name == "door.py" else ""))
    return scan(tmp_path, "pkg")


def test_the_scanner_finds_each_way_a_reason_is_made(tmp_path: Path) -> None:
    found = synthetic(tmp_path)
    assert set(found) == {
        "inherited-init",
        "upstream-*",
        "via-parameter",
        "returned-in-tuple",
        "constant-reason",
        "in-a-dict",
        "by-keyword",
        "via-module-attribute",
        "from-dict-get",
        "stored",
        "duplicate-body",
        "in-json-text",
        "kind-from-table",
        "kind-two",
        "kind-fallback",
        "kind-inline",
        "kind-by-default",
        "kind-via-attribute",
        "typed-field",
    }
    deny, child = line_of(tmp_path, 'deny("via-parameter")'), line_of(tmp_path, 'self._escape("kind-via-attribute")')
    assert found["via-parameter"] == {f"pkg/door.py:{deny}"}
    assert found["kind-via-attribute"] == {f"pkg/door.py:{child}"}


def line_of(tmp_path: Path, text: str) -> int:
    lines = (tmp_path / "pkg" / "door.py").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def test_a_reason_added_tomorrow_fails_until_it_is_documented(tmp_path: Path) -> None:
    table = {code: code for code in synthetic(tmp_path)}
    tomorrow = """
        class Later:
            def refuse(self, runtime) -> None:
                runtime.record("denied", reason=LATER)
                raise SubError(NEW_ONE)

        NEW_ONE = "brand-new-reason"
        LATER = "another-" + NEW_ONE
    """
    found = synthetic(tmp_path, tomorrow)
    record, raise_ = line_of(tmp_path, "reason=LATER"), line_of(tmp_path, "SubError(NEW_ONE)")
    assert differences(found, table) == [
        f"'another-brand-new-reason' is emitted (pkg/door.py:{record}) but docs/reasons.md does not list it",
        f"'brand-new-reason' is emitted (pkg/door.py:{raise_}) but docs/reasons.md does not list it",
    ]
    assert differences(found, {**table, "brand-new-reason": "x", "another-brand-new-reason": "y", "gone": "gone"}) == [
        "docs/reasons.md lists 'gone', which nothing in proxy/ emits any more"
    ]


def test_the_table_reads_placeholders_as_patterns() -> None:
    text = (
        "| reason | HTTP |\n|---|---|\n| `upstream-<status>`, `upstream-<grpc-code>` | 502 |\n| `missing-token` | 401 |"
    )
    assert documented(text) == {"upstream-*": "upstream-<grpc-code>", "missing-token": "missing-token"}
