//! `deploy/` as the Kubernetes walkthrough (`docs/kubernetes.md`) uses it.
//!
//! Without a cluster: the names the walkthrough relies on agree. Each component has one image
//! name, which the walkthrough builds, pulled `IfNotPresent` and never `:latest`; every token
//! path is the `token` (or `exec-token`) key of the one Secret the walkthrough creates, and no
//! manifest ships a Secret that would overwrite it; every example BatchSandbox names a Pool that
//! `deploy/` defines.
//!
//! Against the real kube-apiserver of the controller's tests (`kube_env`): every manifest applies
//! (server-side apply, dry run, strict field validation), every Pool's pod template is a Pod the
//! apiserver accepts, and the walkthrough's BatchSandbox allocates from the walkthrough's Pool and
//! runs its tasks in the end-to-end environment (the stand-in kubelet gives each pod a real
//! sandlet).

// The tests' support; this file uses part of it (no executor is killed here).
#[allow(dead_code)]
mod kube_env;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};
use kube::{Client, ResourceExt};
use kube_env::{FakeKubelet, KubeEnv, eventually};
use sandlet_controller::crd::{ALLOC_STATUS, BatchSandbox, POOL_NAME, PodList, Pool};
use serde_json::{Value, json};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const WALKTHROUGH: &str = include_str!("../../docs/kubernetes.md");
/// The namespace the walkthrough's Pools and BatchSandboxes go to (the walkthrough uses the
/// current one); the controller's own namespace is in its manifests.
const NS: &str = "walkthrough";
const TOKEN_SECRET: &str = "sandlet-token";
const TOKEN: &str = "walkthrough-executor-token";

/// One YAML document of a file under `deploy/`.
struct Manifest {
    file: String,
    doc: Value,
}

impl Manifest {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// Directories of `deploy/` the walkthrough does not apply: `local-node/` holds manifests for
/// `.ci/node` (its local images, `imagePullPolicy: Never`; tests/real_node runs them) and
/// `helm/` the chart, whose templates are YAML only once rendered (tests/real_node installs
/// it; its CRDs are compared with `crds/` below).
const NOT_THE_WALKTHROUGHS: [&str; 2] = ["local-node", "helm"];

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.parent() == Some(Path::new(DEPLOY))
                && NOT_THE_WALKTHROUGHS.iter().any(|d| path.ends_with(d))
            {
                continue;
            }
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            found.push(path);
        }
    }
}

/// Every document of every YAML file under `deploy/`, in file order.
fn manifests() -> Vec<Manifest> {
    let mut files = Vec::new();
    yaml_files(Path::new(DEPLOY), &mut files);
    files.sort();
    let mut all = Vec::new();
    for path in files {
        let file = path.strip_prefix(DEPLOY).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let doc: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
            if !doc.is_null() {
                all.push(Manifest {
                    file: file.clone(),
                    doc,
                });
            }
        }
    }
    assert!(
        all.len() >= 6,
        "deploy/ holds too few manifests: {}",
        all.len()
    );
    all
}

fn manifest<'a>(all: &'a [Manifest], file: &str, kind: &str) -> &'a Manifest {
    all.iter()
        .find(|m| m.file == file && m.kind() == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/{file}"))
}

/// The pod specs a manifest holds: a Pool's, a Deployment's or a BatchSandbox's template.
fn pod_specs(doc: &Value) -> Vec<&Value> {
    let spec = &doc["spec"]["template"]["spec"];
    if spec.is_object() { vec![spec] } else { vec![] }
}

fn containers(pod_spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|key| pod_spec[key].as_array())
        .flatten()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[test]
fn the_names_the_walkthrough_relies_on_agree() {
    let all = manifests();
    let mut ours = BTreeSet::new();
    for m in &all {
        assert_ne!(
            m.kind(),
            "Secret",
            "deploy/{} ships a Secret: applying it would overwrite the token the walkthrough creates",
            m.file
        );
        for pod in pod_specs(&m.doc) {
            let secret_volumes: Vec<&str> = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["secret"].is_object())
                .map(|v| {
                    let secret = str_of(&v["secret"]["secretName"]);
                    assert_eq!(
                        secret, TOKEN_SECRET,
                        "deploy/{}: a Secret other than the walkthrough's",
                        m.file
                    );
                    str_of(&v["name"])
                })
                .collect();
            for c in containers(pod) {
                let what = format!("deploy/{}: container {}", m.file, str_of(&c["name"]));
                let image = str_of(&c["image"]);
                let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
                assert!(
                    !tag.is_empty() && !tag.contains('/') && tag != "latest",
                    "{what}: image {image:?} needs a tag other than latest"
                );
                assert_eq!(
                    str_of(&c["imagePullPolicy"]),
                    "IfNotPresent",
                    "{what}: imagePullPolicy"
                );
                if image.starts_with("sandlet") {
                    ours.insert(image.to_string());
                }
                // Token paths: the Secret's keys, where the container mounts it.
                let mounts: Vec<&str> = c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| secret_volumes.contains(&str_of(&v["name"])))
                    .map(|v| str_of(&v["mountPath"]))
                    .collect();
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(str_of)
                    .collect();
                let mut token_paths: Vec<(&str, &str)> = args
                    .windows(2)
                    .filter(|w| w[0] == "--executor-token-file" || w[0] == "--token-file")
                    .map(|w| (w[1], "token"))
                    .collect();
                for env in c["env"].as_array().into_iter().flatten() {
                    match str_of(&env["name"]) {
                        "SANDLET_TOKEN_FILE" => token_paths.push((str_of(&env["value"]), "token")),
                        "SANDLET_EXEC_TOKEN_FILE" => {
                            token_paths.push((str_of(&env["value"]), "exec-token"))
                        }
                        _ => {}
                    }
                }
                for (path, key) in token_paths {
                    assert!(
                        mounts.iter().any(|m| path == format!("{m}/{key}")),
                        "{what}: token file {path} is not key {key:?} of Secret {TOKEN_SECRET} as mounted ({mounts:?})"
                    );
                }
            }
        }
    }
    assert_eq!(
        ours.iter().map(String::as_str).collect::<Vec<_>>(),
        ["sandlet-controller:dev", "sandlet:dev", "sandlet:execd"],
        "one image name per component"
    );
    for image in &ours {
        assert!(
            WALKTHROUGH.contains(&format!("-t {image} ")),
            "docs/kubernetes.md does not build {image}"
        );
    }

    let pools: BTreeSet<&str> = all
        .iter()
        .filter(|m| m.kind() == "Pool")
        .map(Manifest::name)
        .collect();
    let examples: Vec<&Manifest> = all.iter().filter(|m| m.kind() == "BatchSandbox").collect();
    assert!(!examples.is_empty(), "no example BatchSandbox in deploy/");
    for b in examples {
        let pool = str_of(&b.doc["spec"]["poolRef"]);
        assert!(
            b.doc["spec"]["template"].is_object() || pools.contains(pool),
            "deploy/{}: poolRef {pool:?} names none of the Pools in deploy/ ({pools:?})",
            b.file
        );
    }
}

#[test]
fn the_charts_crds_are_deploy_crds() {
    let chart = std::fs::read_to_string(format!(
        "{DEPLOY}/helm/sandlet/crds/sandbox.opensandbox.io.yaml"
    ))
    .unwrap();
    assert!(
        chart == include_str!("../../deploy/crds/sandbox.opensandbox.io.yaml"),
        "deploy/helm/sandlet/crds/ differs from deploy/crds/: copy it again after crdgen"
    );
}

/// Applies one document by server-side apply through the dynamic API, with strict field
/// validation (an unknown or misspelt field is an error), optionally as a dry run.
async fn apply(
    client: &Client,
    discovery: &Discovery,
    doc: &Value,
    dry_run: bool,
) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
    let types = object.types.as_ref().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(types).unwrap();
    let (resource, capabilities) = discovery
        .resolve_gvk(&gvk)
        .unwrap_or_else(|| panic!("the apiserver does not serve {gvk:?}"));
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object.metadata.namespace.as_deref().unwrap_or(NS),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply("sandlet-walkthrough").validation_strict();
    if dry_run {
        params = params.dry_run();
    }
    api.patch(&object.name_any(), &params, &Patch::Apply(doc))
        .await
}

/// An apiserver with the CRDs, the walkthrough's namespace and the controller's, as the
/// walkthrough has them before it applies `deploy/`.
async fn walkthrough_cluster() -> (KubeEnv, Discovery) {
    let env = KubeEnv::start_with(NS).await;
    Api::<Namespace>::all(env.client())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "opensandbox-system"}})).unwrap(),
        )
        .await
        .unwrap();
    let discovery = Discovery::new(env.client()).run().await.unwrap();
    (env, discovery)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd: `./test` builds them and runs every test"]
async fn every_manifest_applies_to_the_real_apiserver() {
    let (env, discovery) = walkthrough_cluster().await;
    let client = env.client();
    let all = manifests();
    for m in &all {
        apply(&client, &discovery, &m.doc, true)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "deploy/{}: {} {} does not apply: {e}",
                    m.file,
                    m.kind(),
                    m.name()
                )
            });
    }
    // A Pool's template is kept as it is written (the CRD does not validate it): the apiserver
    // judges it as the Pod the controller will create from it.
    let mut templates = 0;
    for m in all.iter().filter(|m| m.kind() == "Pool") {
        let template = &m.doc["spec"]["template"];
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{}-template", m.name()), "labels": template["metadata"]["labels"]},
            "spec": template["spec"],
        });
        apply(&client, &discovery, &pod, true)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "deploy/{}: Pool {}'s template is not a valid Pod: {e}",
                    m.file,
                    m.name()
                )
            });
        templates += 1;
    }
    assert_eq!(
        templates, 3,
        "the sidecar, the in-container and the OpenSandbox server's Pool"
    );
    // Dry runs leave nothing behind.
    assert!(
        Api::<Pool>::namespaced(client.clone(), NS)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd: `./test` builds them and runs every test"]
async fn the_walkthroughs_batchsandbox_allocates_from_its_pool() {
    let (env, discovery) = walkthrough_cluster().await;
    let client = env.client();
    let kubelet = FakeKubelet::start(client.clone(), NS, TOKEN).await;
    let controller = kube_env::start_controller(client.clone(), NS, TOKEN);
    let all = manifests();
    let pool = manifest(&all, "pool-sidecar.yaml", "Pool");
    let demo = manifest(&all, "examples/demo.yaml", "BatchSandbox");
    assert_eq!(str_of(&demo.doc["spec"]["poolRef"]), pool.name());

    apply(&client, &discovery, &pool.doc, false).await.unwrap();
    let buffer = pool.doc["spec"]["capacitySpec"]["bufferMin"]
        .as_i64()
        .unwrap() as i32;
    let pools: Api<Pool> = Api::namespaced(client.clone(), NS);
    eventually(
        "the walkthrough's pool fills its buffer",
        Duration::from_secs(60),
        async || {
            let s = pools.get(pool.name()).await.ok()?.status?;
            (s.available >= buffer).then_some(())
        },
    )
    .await;

    apply(&client, &discovery, &demo.doc, false).await.unwrap();
    let replicas = demo.doc["spec"]["replicas"].as_i64().unwrap() as i32;
    let sandboxes: Api<BatchSandbox> = Api::namespaced(client.clone(), NS);
    // Shard 2 exits 3; the others succeed after a few seconds.
    let ended = eventually(
        "the demo's pods allocated and its tasks ended: 2 SUCCEED, 1 FAILED",
        Duration::from_secs(90),
        async || {
            let b = sandboxes.get(demo.name()).await.ok()?;
            let s = b.status.clone()?;
            (s.allocated == replicas && s.task_succeed == 2 && s.task_failed == 1).then_some(b)
        },
    )
    .await;

    // The pods are the pool's, and each task ran in its pod's sandlet.
    let held = PodList::from_annotation(ended.metadata.annotations.as_ref(), ALLOC_STATUS).pods;
    assert_eq!(held.len(), replicas as usize);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for name in &held {
        let pod = pods.get(name).await.unwrap();
        assert_eq!(
            pod.labels().get(POOL_NAME).map(String::as_str),
            Some(pool.name()),
            "pod {name} is not the walkthrough pool's"
        );
    }
    let first = &kube_env::endpoints(&ended)[0];
    let logs = reqwest::Client::new()
        .get(format!("http://{first}:5758/tasks/{}-0/logs", demo.name()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        logs.starts_with("hello from "),
        "task demo-0 printed {logs:?}"
    );
    controller.abort();
    drop(kubelet);
}
