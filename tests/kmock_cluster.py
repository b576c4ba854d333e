"""kmock's in-process Kubernetes API emulator (HTTP on 127.0.0.1) set up for peg's operator tests:
every resource the operator touches, a kubeconfig naming it, and helpers that play the job
controllers' status writes.

What the emulator does not model: schema validation, pruning and defaulting, garbage collection,
uid / generation / resourceVersion, server-side label selectors (see test_operator_kopf.py).
What this module adds to it, for pods that reach it in-cluster: HTTPS with a CA of its own, and
RBAC for service-account tokens (`Authorizer`, Kubernetes' rules, SelfSubjectAccessReview).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import secrets
import ssl
from collections import Counter
from collections.abc import Iterable, Mapping

import aiohttp.test_utils
import aiohttp.web
import kmock

from peg.k8s.vocabulary import JOB_KINDS, LABEL_STAGE, PIPELINE

GROUP, VERSION, KIND, PLURAL = PIPELINE.group, PIPELINE.version, PIPELINE.kind, PIPELINE.plural

RESOURCES = {
    f"{GROUP}/{VERSION}/{PLURAL}": (KIND, True, {"status"}),
    **{f"{k.group}/{k.version}/{k.plural}": (k.kind, True, set()) for k in JOB_KINDS},
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/pods": ("Pod", True, {"log"}),
    "v1/events": ("Event", True, set()),
    "v1/namespaces": ("Namespace", False, set()),  # kopf waits for it in discovery, never calls it
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
TEST_AGENT = "peg-operator-test"  # the test's own API calls carry it; the operator's do not
ADMIN_TOKEN = "test"  # the kubeconfig's user: allowed everything, as a cluster admin
SELF_SUBJECT_ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def request_verb(method: str, name: str | None, params: Mapping[str, str]) -> str:
    """The RBAC verb of a resource request (k8s.io/apiserver endpoints/request, RequestInfoFactory)."""
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]


class Authorizer:
    """Kubernetes RBAC over rendered Role/ClusterRole/RoleBinding/ClusterRoleBinding objects, for
    the service-account tokens it issues (plugin/pkg/auth/authorizer/rbac/rbac.go and
    pkg/apis/rbac/v1/evaluation_helpers.go at v1.33: a binding's subjects get its role's rules, a
    RoleBinding's only in its namespace; a rule allows a request when its verbs, apiGroups,
    resources (`*`, `resource/subresource`, `*/subresource`) and resourceNames all match)."""

    def __init__(self, objects: Iterable[Mapping]):
        objects = list(objects)
        self.roles = {(o["kind"], o["metadata"].get("namespace", "") if o["kind"] == "Role" else "", o["metadata"]["name"]): o
                      for o in objects if o["kind"] in ("Role", "ClusterRole")}
        self.bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
        self.accounts: dict[str, tuple[str, str]] = {}  # token -> (namespace, service account)
        self.denied: list[tuple[str, str, str, str, str]] = []  # (account, namespace, verb, group, resource)

    def token_for(self, namespace: str, account: str) -> str:
        token = secrets.token_urlsafe(24)
        self.accounts[token] = (namespace, account)
        return token

    def _subject_matches(self, subject: Mapping, namespace: str, account: str) -> bool:
        if subject["kind"] == "ServiceAccount":
            return (subject["name"], subject.get("namespace")) == (account, namespace)
        if subject["kind"] == "User":
            return subject["name"] == f"system:serviceaccount:{namespace}:{account}"
        return subject["name"] in ("system:authenticated", "system:serviceaccounts", f"system:serviceaccounts:{namespace}")

    def allowed(self, namespace: str, account: str, verb: str, group: str, resource: str, name: str | None,
                where: str | None) -> bool:
        """May `account` of `namespace` do `verb` on `group`'s `resource` (with "/subresource"),
        named `name`, in namespace `where` (None: cluster-scoped)?"""
        plural, _, subresource = resource.partition("/")
        for binding in self.bindings:
            scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
            if scope is not None and scope != where:
                continue
            if not any(self._subject_matches(s, namespace, account) for s in binding.get("subjects") or []):
                continue
            ref = binding["roleRef"]
            role = self.roles.get((ref["kind"], scope if ref["kind"] == "Role" else "", ref["name"]), {})
            for rule in role.get("rules") or []:
                if (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])) and \
                        (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) and \
                        any(r in ("*", resource) or (subresource and r == f"*/{subresource}") for r in rule.get("resources", [])) and \
                        (not rule.get("resourceNames") or name in rule["resourceNames"]):
                    return True
        self.denied.append((f"{namespace}/{account}", where or "", verb, group, plural + (f"/{subresource}" if subresource else "")))
        return False

    def _account(self, request) -> tuple[str, str] | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")  # "Bearer" in any case (RFC 6750)
        return self.accounts.get(token.strip()) if scheme.lower() == "bearer" else None

    def respond(self, request) -> aiohttp.web.Response | None:
        """The API server's answer where authorization decides it: a SelfSubjectAccessReview's
        verdict, or 403 (worded as the API server words it) for what a token this authorizer
        issued may not do. None: the request goes on to the emulator (tokens it did not issue,
        such as the kubeconfig's admin, and discovery are not checked)."""
        subject = self._account(request)
        if str(request.url.path) == SELF_SUBJECT_ACCESS_REVIEWS:
            attributes = request.data["spec"]["resourceAttributes"]
            resource = attributes["resource"] + (f"/{attributes['subresource']}" if attributes.get("subresource") else "")
            allowed = subject is not None and self.allowed(*subject, attributes["verb"], attributes.get("group", ""),
                                                           resource, attributes.get("name"), attributes.get("namespace"))
            return aiohttp.web.json_response({**request.data, "status": {"allowed": allowed}}, status=201)
        if subject is None or request.resource is None or request.resource.plural is None:
            return None  # not a token it issued, or discovery (every authenticated user may read it)
        verb = request_verb(str(request.method.value), request.name, request.params)
        group, plural = str(request.resource.group or ""), str(request.resource.plural)
        if self.allowed(*subject, verb, group, plural + (f"/{request.subresource}" if request.subresource else ""),
                        request.name, request.namespace):
            return None
        message = (f'{plural} is forbidden: User "system:serviceaccount:{subject[0]}:{subject[1]}" cannot {verb} '
                   f'resource "{plural}" in API group "{group}" in the namespace "{request.namespace}"')
        return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                          "reason": "Forbidden", "code": 403}, status=403)


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A CA-less self-signed certificate for 127.0.0.1 (PEM) and its key: the API server's own."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kmock-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


class Cluster:
    """The emulator plus the helpers the test drives it with."""

    def __init__(self, k8s):
        self.k8s = k8s

    def objects(self, resource: str) -> dict[str, dict]:
        return {name: obj.raw for (res, ns, name), obj in self.k8s.objects.items()
                if str(res.plural) == resource.rsplit("/", 1)[-1] and not obj.deleted}

    def job(self, stage: str) -> tuple[str, dict] | None:
        for k in JOB_KINDS:
            for obj in self.objects(k.plural).values():
                if obj["metadata"]["labels"][LABEL_STAGE] == stage:
                    return k.plural, obj
        return None

    def pipeline(self, name: str = "demo") -> dict:
        return self.objects(PLURAL).get(name, {})

    async def wait(self, what, timeout: float = 20.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while (result := what()) is None or result is False:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting; pipeline status: {json.dumps(self.pipeline().get('status'), indent=1)}")
            await asyncio.sleep(0.05)
        return result

    def creates(self) -> Counter:
        """How many times each job was created (POSTs that reached the emulator)."""
        return Counter(r.data["metadata"]["name"] for r in self.k8s
                       if r.method == "POST" and r.resource is not None and str(r.resource.plural) in {k.plural for k in JOB_KINDS})

    def events(self) -> list[tuple[str, str]]:
        """(reason, message) of every event posted (the emulator answers 409 to all but the first:
        it ignores generateName; the requests still show what the operator reported)."""
        return [(r.data["reason"], r.data["message"]) for r in self.k8s
                if r.method == "POST" and r.resource is not None and str(r.resource.plural) == "events"]

    def calls(self) -> set[tuple[str, str, str]]:
        """(group, resource, verb) of every request, as RBAC names them."""
        out = set()
        for r in self.k8s:
            if r.resource is None or r.resource.plural is None or r.headers.get("User-Agent") == TEST_AGENT:
                continue  # discovery (allowed to every authenticated user), or the test's own calls
            verb = request_verb(str(r.method.value), r.name, r.params)
            plural = str(r.resource.plural) + (f"/{r.subresource}" if r.subresource else "")
            out.add((str(r.resource.group or ""), plural, verb))
        return out


def as_test_client():
    from kubernetes import client

    api = client.ApiClient()
    api.user_agent = TEST_AGENT
    return client.CustomObjectsApi(api)


def job_status(kind: str, succeeded: bool) -> dict:
    """A finished job's status as its controller writes it: KubeRay v1.7.0 (rayjob_types.go:
    jobDeploymentStatus Complete / Failed with jobStatus SUCCEEDED / FAILED), Trainer v2.3.0
    (trainjob_types.go: condition Complete / Failed), training-operator v1.9.4 (Succeeded / Failed)."""
    if kind == "RayJob":
        return {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"} if succeeded else {
            "jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
    done = ("Complete" if kind == "TrainJob" else "Succeeded") if succeeded else "Failed"
    return {"conditions": [{"type": done, "status": "True"}]}


def running_job_status(kind: str) -> dict:
    """A started job's status as its controller writes it (its pods are running)."""
    if kind == "RayJob":
        return {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    if kind == "TrainJob":
        return {"jobsStatus": [{"name": "node", "active": 1}]}
    return {"conditions": [{"type": "Running", "status": "True"}]}


async def write_job_status(plural: str, job: dict, status: dict) -> None:
    """Play the job's controller: patch `status` onto the job's status subresource."""
    group, version = job["apiVersion"].split("/")
    meta = job["metadata"]
    await asyncio.to_thread(as_test_client().patch_namespaced_custom_object_status, group, version,
                            meta["namespace"], plural, meta["name"], {"status": status})


def emulator_class(authorizer: Authorizer | None) -> type:
    """kmock's emulator plus what peg's clients need of an API server that kmock 0.8 lacks:
    `authorizer` deciding first (when given), and PUT, which replaces an existing object whole
    (404 when there is none), as `kubectl replace` and `replace_namespaced_config_map` do.
    It overrides kmock's one dispatch point and uses its object store (private names)."""

    class Emulator(kmock.KubernetesEmulator):
        async def _handle(self, request):
            if authorizer is not None and (refused := authorizer.respond(request)) is not None:
                return refused
            if str(request.method.value) == "PUT" and request.resource is not None and request.name is not None:
                return await self._replace(request)
            return await super()._handle(request)

        async def _replace(self, request):
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self._objects or self._objects[key].deleted:
                    return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                      "reason": "NotFound", "code": 404}, status=404)
                self._objects[key].create(request.data)
                raw = self._objects[key].raw
                await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
            return aiohttp.web.json_response(raw)

    return Emulator


@contextlib.asynccontextmanager
async def emulated_cluster(tmp_path, monkeypatch, tls: bool = False, rbac: Iterable[Mapping] | None = None):
    """kmock's Kubernetes emulator serving RESOURCES on 127.0.0.1, the kubeconfig pointing at it.

    `tls`: HTTPS with a certificate of its own (`Cluster.api` is then what a pod needs to reach it
    in-cluster, for the pod runner); `rbac`: the rendered RBAC objects an `Authorizer` enforces on
    service-account tokens (`Cluster.authorizer`). The kubeconfig's admin token is never refused."""
    from kubernetes import config as kube_config

    from peg.k8s.pods import ApiServer

    server_cls, ca_pem = aiohttp.test_utils.RawTestServer, None
    if tls:
        ca_pem, key_pem = self_signed_certificate()
        (tmp_path / "apiserver.crt").write_bytes(ca_pem)
        (tmp_path / "apiserver.key").write_bytes(key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tmp_path / "apiserver.crt", tmp_path / "apiserver.key")

        class TLSServer(aiohttp.test_utils.RawTestServer):
            async def start_server(self, loop=None, **kwargs):
                await super().start_server(loop=loop, ssl=context, **kwargs)

        server_cls = TLSServer
    authorizer = Authorizer(rbac or [])
    async with emulator_class(authorizer if rbac is not None else None)() as k8s, \
            kmock.Server(k8s, server_cls=server_cls) as server:
        for key, (kind, namespaced, subresources) in RESOURCES.items():
            k8s.resources[key].kind = kind
            k8s.resources[key].namespaced = namespaced
            k8s.resources[key].verbs = VERBS
            k8s.resources[key].subresources = subresources
        cluster_entry = {"server": str(server.url).rstrip("/")}
        if ca_pem:
            cluster_entry["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": cluster_entry}],
            "users": [{"name": "kmock", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        kube_config.load_kube_config(str(kubeconfig))
        cluster = Cluster(k8s)
        cluster.authorizer = authorizer
        cluster.api = ApiServer(server.host, server.port, ca_pem, authorizer.token_for) if tls else None
        yield cluster
