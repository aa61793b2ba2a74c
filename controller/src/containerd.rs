//! The node's containerd, reached on its gRPC socket: what a pause needs of it. A container's
//! filesystem is committed the way `docker commit` and `nerdctl commit` do it: the task is
//! frozen, containerd's diff service writes the difference between the container's snapshot
//! and its parent (the image's top layer) into the content store as an uncompressed layer, and
//! a new image (the container's image plus that layer: a new config and manifest) is registered
//! under a name of our choosing. Nothing leaves the node: the image lives in that containerd only
//! (no registry), so a pod made from it must run on the same node.
//!
//! Only the messages and fields used here are declared (prost skips the others); their field
//! numbers are those of containerd's API (`github.com/containerd/containerd/api`, v1.x).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// containerd's namespace of the kubelet's containers and images (the CRI plugin's).
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The media type of the layer a commit writes: an uncompressed tar, whose digest is its diff
/// ID (no second pass to compute one).
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const INDEXES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Content and snapshots made during a commit are held by a lease until the image references
/// them; if this process dies mid-way, containerd collects them once the lease expires.
const LEASE_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach containerd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("containerd {call}: {status}", status = .source.message())]
    Call {
        call: &'static str,
        source: Box<Status>,
    },
    #[error("{0}")]
    Image(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// What a commit made.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The new image's manifest digest.
    pub digest: String,
    /// The size of the layer holding the container's changes.
    pub layer_size: i64,
}

pub struct Containerd {
    channel: Channel,
    path: PathBuf,
}

impl Containerd {
    /// A client of the socket at `path`; it connects on first use (and again after containerd
    /// restarts).
    pub fn new(path: &Path) -> Containerd {
        let socket = path.to_path_buf();
        // The URI is required but unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://containerd.sock")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        Containerd {
            channel,
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn request<T>(&self, message: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(
            "containerd-namespace",
            MetadataValue::from_static(K8S_NAMESPACE),
        );
        if let Some(lease) = lease.and_then(|l| MetadataValue::try_from(l).ok()) {
            metadata.insert("containerd-lease", lease);
        }
        request
    }

    async fn grpc(&self) -> Result<tonic::client::Grpc<Channel>> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|source| Error::Connect {
            path: self.path.clone(),
            source,
        })?;
        Ok(grpc)
    }

    async fn unary<Req, Res>(
        &self,
        call: &'static str,
        message: Req,
        lease: Option<&str>,
    ) -> Result<Res>
    where
        Req: prost::Message + Send + Sync + 'static,
        Res: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc().await?;
        let codec = tonic_prost::ProstCodec::<Req, Res>::default();
        grpc.unary(
            self.request(message, lease),
            http::uri::PathAndQuery::from_static(call),
            codec,
        )
        .await
        .map(tonic::Response::into_inner)
        .map_err(|e| Error::Call {
            call,
            source: Box::new(e),
        })
    }

    /// Commits container `container_id`'s filesystem changes as image `name` (replacing an
    /// image of that name). The container is frozen while its changes are read, so the layer
    /// is one moment's state.
    pub async fn commit(
        &self,
        container_id: &str,
        name: &str,
        created_by: &str,
    ) -> Result<Committed> {
        let container: api::GetContainerResponse = self
            .unary(
                "/containerd.services.containers.v1.Containers/Get",
                api::GetContainerRequest {
                    id: container_id.into(),
                },
                None,
            )
            .await?;
        let container = container
            .container
            .ok_or_else(|| Error::Image(format!("container {container_id}: no record")))?;
        let lease = self.lease().await?;
        let result = self
            .commit_leased(&container, name, created_by, &lease)
            .await;
        let _: () = self
            .unary(
                "/containerd.services.leases.v1.Leases/Delete",
                api::DeleteLeaseRequest {
                    id: lease,
                    sync: false,
                },
                None,
            )
            .await
            .unwrap_or_else(|e| tracing::warn!(error = %e, "lease not deleted; it expires"));
        result
    }

    async fn lease(&self) -> Result<String> {
        let expires =
            chrono::Utc::now() + chrono::TimeDelta::from_std(LEASE_LIFETIME).expect("an hour fits");
        let id = format!(
            "sandlet-commit-{}",
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        let created: api::CreateLeaseResponse = self
            .unary(
                "/containerd.services.leases.v1.Leases/Create",
                api::CreateLeaseRequest {
                    id,
                    labels: HashMap::from([(
                        "containerd.io/gc.expire".to_string(),
                        expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    )]),
                },
                None,
            )
            .await?;
        created
            .lease
            .map(|l| l.id)
            .ok_or_else(|| Error::Image("containerd created a lease without an id".into()))
    }

    async fn commit_leased(
        &self,
        container: &api::Container,
        name: &str,
        created_by: &str,
        lease: &str,
    ) -> Result<Committed> {
        let layer = self.diff(container, lease).await?;
        let base: api::GetImageResponse = self
            .unary(
                "/containerd.services.images.v1.Images/Get",
                api::GetImageRequest {
                    name: container.image.clone(),
                },
                None,
            )
            .await?;
        let target = base
            .image
            .and_then(|i| i.target)
            .ok_or_else(|| Error::Image(format!("image {}: no target", container.image)))?;
        let manifest = self.platform_manifest(&target).await?;
        let config_digest = manifest["config"]["digest"].as_str().ok_or_else(|| {
            Error::Image(format!(
                "image {}: manifest without config",
                container.image
            ))
        })?;
        let mut config: Value = serde_json::from_slice(&self.read(config_digest).await?)
            .map_err(|e| Error::Image(format!("image {}: config: {e}", container.image)))?;
        let diff_ids = config["rootfs"]["diff_ids"].as_array_mut().ok_or_else(|| {
            Error::Image(format!(
                "image {}: config without rootfs.diff_ids",
                container.image
            ))
        })?;
        diff_ids.push(json!(layer.digest));
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let history = json!({"created": now, "created_by": created_by});
        match config["history"].as_array_mut() {
            Some(entries) => entries.push(history),
            None => config["history"] = json!([history]),
        }
        config["created"] = json!(now);
        let config = serde_json::to_vec(&config).expect("JSON serialises");
        let config = self.write(&config, HashMap::new(), lease).await?;

        let mut layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        layers.push(
            json!({"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}),
        );
        // Garbage-collection references: the manifest keeps its config and layers alive.
        let mut labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            config.digest.clone(),
        )]);
        for (i, l) in layers.iter().enumerate() {
            if let Some(digest) = l["digest"].as_str() {
                labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), digest.into());
            }
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": layers,
        });
        let manifest = serde_json::to_vec(&manifest).expect("JSON serialises");
        let manifest = self.write(&manifest, labels, lease).await?;
        let image = api::Image {
            name: name.into(),
            labels: HashMap::new(),
            target: Some(api::Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: manifest.digest.clone(),
                size: manifest.size,
                annotations: HashMap::new(),
            }),
        };
        let created: Result<api::CreateImageResponse> = self
            .unary(
                "/containerd.services.images.v1.Images/Create",
                api::CreateImageRequest {
                    image: Some(image.clone()),
                },
                Some(lease),
            )
            .await;
        match created {
            Err(Error::Call { source, .. }) if source.code() == tonic::Code::AlreadyExists => {
                let _: api::UpdateImageResponse = self
                    .unary(
                        "/containerd.services.images.v1.Images/Update",
                        api::UpdateImageRequest { image: Some(image) },
                        Some(lease),
                    )
                    .await?;
            }
            other => {
                other?;
            }
        }
        Ok(Committed {
            digest: manifest.digest,
            layer_size: layer.size,
        })
    }

    /// The container's changes over its image, as a layer in the content store.
    async fn diff(&self, container: &api::Container, lease: &str) -> Result<api::Descriptor> {
        let snapshotter = container.snapshotter.clone();
        let key = container.snapshot_key.clone();
        let stat: api::StatSnapshotResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Stat",
                api::StatSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: key.clone(),
                },
                None,
            )
            .await?;
        let parent = stat.info.map(|i| i.parent).unwrap_or_default();
        let view_key = format!("{key}-sandlet-commit-view");
        // A view left by an interrupted commit would make the new one fail.
        let _: Result<()> = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Remove",
                api::RemoveSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: view_key.clone(),
                },
                None,
            )
            .await;
        let lower: api::ViewSnapshotResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/View",
                api::ViewSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: view_key.clone(),
                    parent,
                },
                Some(lease),
            )
            .await?;
        let upper: api::MountsResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Mounts",
                api::MountsRequest {
                    snapshotter: snapshotter.clone(),
                    key,
                },
                None,
            )
            .await?;
        let task = api::TaskRequest {
            container_id: container.id.clone(),
        };
        let frozen: Result<()> = self
            .unary(
                "/containerd.services.tasks.v1.Tasks/Pause",
                task.clone(),
                None,
            )
            .await;
        if let Err(e) = &frozen {
            tracing::warn!(container = %container.id, error = %e, "not frozen during the commit");
        }
        let diff: Result<api::DiffResponse> = self
            .unary(
                "/containerd.services.diff.v1.Diff/Diff",
                api::DiffRequest {
                    left: lower.mounts,
                    right: upper.mounts,
                    media_type: LAYER_TAR.into(),
                    r#ref: format!("sandlet-commit-{}", container.id),
                },
                Some(lease),
            )
            .await;
        if frozen.is_ok() {
            let thawed: Result<()> = self
                .unary("/containerd.services.tasks.v1.Tasks/Resume", task, None)
                .await;
            if let Err(e) = thawed {
                tracing::error!(container = %container.id, error = %e, "left frozen after the commit");
            }
        }
        let _: Result<()> = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Remove",
                api::RemoveSnapshotRequest {
                    snapshotter,
                    key: view_key,
                },
                None,
            )
            .await;
        diff?
            .diff
            .ok_or_else(|| Error::Image("containerd's diff returned no layer".into()))
    }

    /// The manifest of `target`: itself, or this machine's platform's entry of an index.
    async fn platform_manifest(&self, target: &api::Descriptor) -> Result<Value> {
        let parse = |bytes: Vec<u8>, what: &str| -> Result<Value> {
            serde_json::from_slice(&bytes).map_err(|e| Error::Image(format!("{what}: {e}")))
        };
        let top = parse(self.read(&target.digest).await?, &target.digest)?;
        if !INDEXES.contains(&target.media_type.as_str()) {
            return Ok(top);
        }
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let entry = top["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| {
                Error::Image(format!("index {}: no linux/{arch} manifest", target.digest))
            })?;
        parse(self.read(entry).await?, entry)
    }

    async fn read(&self, digest: &str) -> Result<Vec<u8>> {
        const CALL: &str = "/containerd.services.content.v1.Content/Read";
        let mut grpc = self.grpc().await?;
        let codec =
            tonic_prost::ProstCodec::<api::ReadContentRequest, api::ReadContentResponse>::default();
        let failed = |e: Status| Error::Call {
            call: CALL,
            source: Box::new(e),
        };
        let mut stream = grpc
            .server_streaming(
                self.request(
                    api::ReadContentRequest {
                        digest: digest.into(),
                    },
                    None,
                ),
                http::uri::PathAndQuery::from_static(CALL),
                codec,
            )
            .await
            .map_err(failed)?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(failed)? {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// Writes `data` into the content store (kept by the lease until referenced); content that
    /// is already there is fine.
    async fn write(
        &self,
        data: &[u8],
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<Blob> {
        const CALL: &str = "/containerd.services.content.v1.Content/Write";
        let digest = format!("sha256:{:x}", Sha256::digest(data));
        let size = data.len() as i64;
        let blob = Blob {
            digest: digest.clone(),
            size,
        };
        let reference = format!("sandlet-{digest}");
        let requests = vec![
            api::WriteContentRequest {
                action: api::WRITE,
                r#ref: reference.clone(),
                total: size,
                expected: digest.clone(),
                offset: 0,
                data: data.to_vec(),
                labels: HashMap::new(),
            },
            api::WriteContentRequest {
                action: api::COMMIT,
                r#ref: reference,
                total: size,
                expected: digest,
                offset: size,
                data: Vec::new(),
                labels,
            },
        ];
        let mut grpc = self.grpc().await?;
        let codec =
            tonic_prost::ProstCodec::<api::WriteContentRequest, api::WriteContentResponse>::default(
            );
        let written = async {
            let mut stream = grpc
                .streaming(
                    self.request(tokio_stream::iter(requests), Some(lease)),
                    http::uri::PathAndQuery::from_static(CALL),
                    codec,
                )
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, Status>(())
        };
        match written.await {
            Ok(()) => Ok(blob),
            // Content already there (the same bytes: the digest says so).
            Err(e) if e.code() == tonic::Code::AlreadyExists => Ok(blob),
            Err(e) => Err(Error::Call {
                call: CALL,
                source: Box::new(e),
            }),
        }
    }

    /// Removes image `name` (its content goes with containerd's next collection, unless
    /// another image or a container still uses it). An image already gone is fine.
    pub async fn delete_image(&self, name: &str) -> Result<()> {
        let deleted: Result<()> = self
            .unary(
                "/containerd.services.images.v1.Images/Delete",
                api::DeleteImageRequest {
                    name: name.into(),
                    sync: false,
                },
                None,
            )
            .await;
        match deleted {
            Err(Error::Call { source, .. }) if source.code() == tonic::Code::NotFound => Ok(()),
            other => other,
        }
    }
}

struct Blob {
    digest: String,
    size: i64,
}

/// The subset of containerd's API messages used above.
mod api {
    use std::collections::HashMap;

    pub const WRITE: i32 = 1;
    pub const COMMIT: i32 = 2;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mount {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(string, tag = "2")]
        pub source: String,
        #[prost(string, tag = "3")]
        pub target: String,
        #[prost(string, repeated, tag = "4")]
        pub options: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Descriptor {
        #[prost(string, tag = "1")]
        pub media_type: String,
        #[prost(string, tag = "2")]
        pub digest: String,
        #[prost(int64, tag = "3")]
        pub size: i64,
        #[prost(map = "string, string", tag = "5")]
        pub annotations: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "3")]
        pub image: String,
        #[prost(string, tag = "6")]
        pub snapshotter: String,
        #[prost(string, tag = "7")]
        pub snapshot_key: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetContainerRequest {
        #[prost(string, tag = "1")]
        pub id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetContainerResponse {
        #[prost(message, optional, tag = "1")]
        pub container: Option<Container>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TaskRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatSnapshotRequest {
        #[prost(string, tag = "1")]
        pub snapshotter: String,
        #[prost(string, tag = "2")]
        pub key: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SnapshotInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub parent: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatSnapshotResponse {
        #[prost(message, optional, tag = "1")]
        pub info: Option<SnapshotInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ViewSnapshotRequest {
        #[prost(string, tag = "1")]
        pub snapshotter: String,
        #[prost(string, tag = "2")]
        pub key: String,
        #[prost(string, tag = "3")]
        pub parent: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ViewSnapshotResponse {
        #[prost(message, repeated, tag = "1")]
        pub mounts: Vec<Mount>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MountsRequest {
        #[prost(string, tag = "1")]
        pub snapshotter: String,
        #[prost(string, tag = "2")]
        pub key: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MountsResponse {
        #[prost(message, repeated, tag = "1")]
        pub mounts: Vec<Mount>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RemoveSnapshotRequest {
        #[prost(string, tag = "1")]
        pub snapshotter: String,
        #[prost(string, tag = "2")]
        pub key: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiffRequest {
        #[prost(message, repeated, tag = "1")]
        pub left: Vec<Mount>,
        #[prost(message, repeated, tag = "2")]
        pub right: Vec<Mount>,
        #[prost(string, tag = "3")]
        pub media_type: String,
        #[prost(string, tag = "4")]
        pub r#ref: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiffResponse {
        #[prost(message, optional, tag = "3")]
        pub diff: Option<Descriptor>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ReadContentRequest {
        #[prost(string, tag = "1")]
        pub digest: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ReadContentResponse {
        #[prost(bytes = "vec", tag = "2")]
        pub data: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteContentRequest {
        #[prost(int32, tag = "1")]
        pub action: i32,
        #[prost(string, tag = "2")]
        pub r#ref: String,
        #[prost(int64, tag = "3")]
        pub total: i64,
        #[prost(string, tag = "4")]
        pub expected: String,
        #[prost(int64, tag = "5")]
        pub offset: i64,
        #[prost(bytes = "vec", tag = "6")]
        pub data: Vec<u8>,
        #[prost(map = "string, string", tag = "7")]
        pub labels: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteContentResponse {
        #[prost(int32, tag = "1")]
        pub action: i32,
        #[prost(string, tag = "6")]
        pub digest: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(map = "string, string", tag = "2")]
        pub labels: HashMap<String, String>,
        #[prost(message, optional, tag = "3")]
        pub target: Option<Descriptor>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetImageRequest {
        #[prost(string, tag = "1")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetImageResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateImageResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpdateImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpdateImageResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteImageRequest {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(bool, tag = "2")]
        pub sync: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Lease {
        #[prost(string, tag = "1")]
        pub id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateLeaseRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(map = "string, string", tag = "3")]
        pub labels: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateLeaseResponse {
        #[prost(message, optional, tag = "1")]
        pub lease: Option<Lease>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteLeaseRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(bool, tag = "2")]
        pub sync: bool,
    }
}
