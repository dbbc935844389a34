{{/*
Install errors for the common mistakes, each saying what to set. values.schema.json checks
shapes and types; the mistakes below pass it on purpose so that `helm install` stops here with a
sentence instead of a schema path. No message repeats a value that may be a secret.
*/}}
{{- define "tracegate.validate" -}}
{{- $v := .Values -}}

{{- /* Policies: exactly one source. */ -}}
{{- if and (not $v.policies.existingConfigMap) (not $v.policies.files) -}}
{{- fail "tracegate: no policies. Put your policy files in a ConfigMap (kubectl create configmap tracegate-policies --from-file=policies/) and set policies.existingConfigMap=tracegate-policies, or give them inline in policies.files (file name: YAML text)." -}}
{{- end -}}
{{- if and $v.policies.existingConfigMap $v.policies.files -}}
{{- fail (printf "tracegate: policies.files and policies.existingConfigMap (%s) are both set: set one of the two." $v.policies.existingConfigMap) -}}
{{- end -}}

{{- /* PostgreSQL: the URL (it holds the password) by Secret reference only. */ -}}
{{- $pg := $v.outbox.postgresql | default dict -}}
{{- if hasKey $pg "url" -}}
{{- fail "tracegate: outbox.postgresql.url is a literal database URL, password included; the chart takes it by Secret reference only. Create the Secret (kubectl create secret generic tracegate-db --from-literal=url='postgresql://USER:PASSWORD@HOST:5432/DB'), remove outbox.postgresql.url and set outbox.postgresql.urlSecret.name=tracegate-db (urlSecret.key: url)." -}}
{{- end -}}
{{- if kindIs "string" $pg.urlSecret -}}
{{- fail "tracegate: outbox.postgresql.urlSecret must name an existing Secret, not hold the URL. Create the Secret (kubectl create secret generic tracegate-db --from-literal=url='postgresql://USER:PASSWORD@HOST:5432/DB') and set outbox.postgresql.urlSecret.name=tracegate-db and outbox.postgresql.urlSecret.key=url." -}}
{{- end -}}
{{- if and (eq $v.outbox.mode "postgresql") (not (($pg.urlSecret | default dict).name)) -}}
{{- fail "tracegate: outbox.mode=postgresql needs the database URL's Secret: create it (kubectl create secret generic tracegate-db --from-literal=url='postgresql://USER:PASSWORD@HOST:5432/DB') and set outbox.postgresql.urlSecret.name=tracegate-db (urlSecret.key: url)." -}}
{{- end -}}

{{- /* Secrets given to the pod as environment variables: by reference only. */ -}}
{{- range $i, $e := $v.secretEnv -}}
{{- if hasKey $e "value" -}}
{{- fail (printf "tracegate: secretEnv[%d] (%s) has a literal value; secrets are taken by Secret reference only. Create the Secret (kubectl create secret generic lightstep-tokens --from-literal=KEY=...), remove secretEnv[%d].value and set secretEnv[%d].secretName and secretEnv[%d].key (or mount it with secretFiles)." $i $e.name $i $i $i) -}}
{{- end -}}
{{- end -}}

{{- /* Gateway mode. */ -}}
{{- if kindIs "string" $v.authz.secret -}}
{{- fail "tracegate: authz.secret must name an existing Secret, not hold the shared secret. Create it (kubectl create secret generic tracegate-authz --from-literal=secret=...) and set authz.secret.name=tracegate-authz (authz.secret.key: secret; authz.secret.mountAs: file or env)." -}}
{{- end -}}
{{- if $v.authz.enabled -}}
{{- if not $v.authz.dialect -}}
{{- fail "tracegate: authz.enabled needs authz.dialect, the gateway that asks: nginx (auth_request), envoy (Envoy ext_authz or Envoy Gateway's SecurityPolicy.extAuth) or traefik (ForwardAuth)." -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled (not $v.authz.from) -}}
{{- fail "tracegate: authz.enabled with an empty authz.from would let every pod and address ask the authorization port, whose answers carry account keys. Set authz.from to the gateway's pods (NetworkPolicy peers, e.g. a namespaceSelector and podSelector matching the gateway's proxy pods)." -}}
{{- end -}}
{{- end -}}
{{- end -}}
