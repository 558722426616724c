//! Uploaded files: the bytes under `[files] dir`, or in an S3-compatible bucket
//! (`[files.s3]`), named by file id.
//!
//! An upload is streamed out while its SHA-256 is computed and its size checked against the
//! purpose's limit, so no file is ever held in memory whole. On disk it goes to a temporary
//! file in the same directory; once complete it is synced, renamed to its id and the
//! directory synced. In a bucket it goes up as a multipart upload (5 MiB parts, at most two
//! in flight), which S3 makes visible only when completed. Either way, only then is the
//! row written ([`crate::store::files`]), so a file a client was told about survives a
//! crash. Temporary files a crash left behind are removed at start; a bucket's abandoned
//! multipart uploads are the bucket's lifecycle rule's to expire. File I/O goes through
//! tokio's blocking pool or the object store's HTTP client, never blocking the runtime.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::config::{FilesConfig, S3Config};

/// The suffix of a file still being written.
const PART: &str = ".part";
/// A temporary file untouched this long was left by a crash (uploads that stall are cut
/// off by the body read timeout long before).
const STALE_PART: Duration = Duration::from_secs(3600);
/// Bytes gathered before a write to disk.
const WRITE_BUFFER: usize = 256 * 1024;
/// S3's smallest part (but the last): the memory one upload holds per part in flight.
const UPLOAD_PART: usize = 5 * 1024 * 1024;
/// Parts of one upload sent at once.
const PARTS_IN_FLIGHT: usize = 2;
/// The longest one call to the bucket may take, a download's whole body included (a
/// 512 MiB file to a reader at 1 MB/s).
const BUCKET_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A file's bytes being read.
pub type FileReader = Pin<Box<dyn AsyncRead + Send>>;

/// Where files live.
#[derive(Debug)]
pub struct FileStore {
    backend: Backend,
    pub config: FilesConfig,
}

#[derive(Debug)]
enum Backend {
    Disk(PathBuf),
    Bucket {
        store: Arc<AmazonS3>,
        prefix: String,
    },
}

/// Bytes written under a new file id, not yet kept.
#[derive(Debug)]
pub struct Written {
    pub id: String,
    pending: Pending,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug)]
enum Pending {
    Disk { tmp: PathBuf, file: tokio::fs::File },
    Bucket(WriteMultipart),
}

/// Why an upload could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the file is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the upload could not be read: {0}")]
    Body(String),
    #[error("the file could not be written: {0}")]
    Io(#[from] io::Error),
}

impl FileStore {
    /// Opens the directory (creating it and removing what a crash left half-written), or
    /// the bucket's client.
    ///
    /// # Errors
    /// When the directory cannot be created or read, or the bucket's settings are unusable.
    pub fn open(config: &FilesConfig) -> io::Result<FileStore> {
        let backend = match &config.s3 {
            Some(s3) => Backend::Bucket {
                store: Arc::new(bucket(s3)?),
                prefix: s3.prefix.clone(),
            },
            None => {
                sweep(&config.dir)?;
                Backend::Disk(config.dir.clone())
            }
        };
        Ok(FileStore {
            backend,
            config: config.clone(),
        })
    }

    fn object(prefix: &str, id: &str) -> ObjectPath {
        ObjectPath::from(format!("{prefix}{id}"))
    }

    /// Writes `body` under a new file id, hashing it, refusing past `limit` bytes. Nothing
    /// is visible until [`FileStore::keep`].
    ///
    /// # Errors
    /// [`WriteError::TooLarge`] past the limit, [`WriteError::Body`] when the body fails,
    /// [`WriteError::Io`] when the disk or the bucket does; what was written is removed.
    pub async fn write<S, E>(&self, body: S, limit: u64) -> Result<Written, WriteError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let id = new_file_id();
        match &self.backend {
            Backend::Disk(dir) => {
                let tmp = dir.join(format!(".{id}{PART}"));
                let result = write_to_disk(&tmp, body, limit).await;
                if result.is_err() {
                    let _ = tokio::fs::remove_file(&tmp).await;
                }
                let (file, bytes, sha256) = result?;
                Ok(Written {
                    id,
                    pending: Pending::Disk { tmp, file },
                    bytes,
                    sha256,
                })
            }
            Backend::Bucket { store, prefix } => {
                let upload = store
                    .put_multipart(&Self::object(prefix, &id))
                    .await
                    .map_err(bucket_error)?;
                let mut upload = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART);
                match write_to_bucket(&mut upload, body, limit).await {
                    Ok((bytes, sha256)) => Ok(Written {
                        id,
                        pending: Pending::Bucket(upload),
                        bytes,
                        sha256,
                    }),
                    Err(e) => {
                        let _ = upload.abort().await;
                        Err(e)
                    }
                }
            }
        }
    }

    /// Makes a written file durable under its id: synced, renamed and the directory synced
    /// on disk; the multipart upload completed in a bucket.
    ///
    /// # Errors
    /// When the disk or the bucket fails; what was written is removed.
    pub async fn keep(&self, written: Written) -> io::Result<()> {
        match (written.pending, &self.backend) {
            (Pending::Disk { tmp, file }, Backend::Disk(dir)) => {
                let kept = async {
                    file.sync_all().await?;
                    drop(file);
                    tokio::fs::rename(&tmp, dir.join(&written.id)).await?;
                    sync_dir(dir).await
                }
                .await;
                if kept.is_err() {
                    let _ = tokio::fs::remove_file(&tmp).await;
                }
                kept
            }
            // `finish` aborts the upload itself when completing fails.
            (Pending::Bucket(upload), _) => upload.finish().await.map(drop).map_err(bucket_error),
            (Pending::Disk { .. }, Backend::Bucket { .. }) => {
                Err(io::Error::other("a file written to disk kept in a bucket"))
            }
        }
    }

    /// Drops a written file that will not be kept.
    pub async fn discard(&self, written: Written) {
        match written.pending {
            Pending::Disk { tmp, file } => {
                drop(file);
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            Pending::Bucket(upload) => {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(file = %written.id, error = %e, "files: aborting an upload failed");
                }
            }
        }
    }

    /// Removes file `id`'s bytes (its row is gone already); a missing file is no error.
    pub async fn remove(&self, id: &str) {
        let removed = match &self.backend {
            Backend::Disk(dir) => match tokio::fs::remove_file(dir.join(id)).await {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
            Backend::Bucket { store, prefix } => {
                match store.delete(&Self::object(prefix, id)).await {
                    Err(object_store::Error::NotFound { .. }) => Ok(()),
                    other => other.map_err(bucket_error),
                }
            }
        };
        if let Err(e) = removed {
            tracing::warn!(file = id, error = %e, "files: removing failed");
        }
    }

    /// Opens file `id` for reading, streamed.
    ///
    /// # Errors
    /// When it is missing or unreadable.
    pub async fn open_file(&self, id: &str) -> io::Result<FileReader> {
        match &self.backend {
            Backend::Disk(dir) => Ok(Box::pin(tokio::fs::File::open(dir.join(id)).await?)),
            Backend::Bucket { store, prefix } => {
                let got = store
                    .get(&Self::object(prefix, id))
                    .await
                    .map_err(bucket_error)?;
                let stream = got.into_stream().map_err(bucket_error);
                Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
            }
        }
    }

    /// Reads file `id` whole, refusing past `limit` bytes (for parts sent upstream inline).
    ///
    /// # Errors
    /// When it is missing, unreadable or too large.
    pub async fn read(&self, id: &str, limit: u64) -> io::Result<Vec<u8>> {
        let too_large = || io::Error::other(format!("larger than {limit} bytes"));
        match &self.backend {
            Backend::Disk(dir) => {
                let path = dir.join(id);
                if tokio::fs::metadata(&path).await?.len() > limit {
                    return Err(too_large());
                }
                tokio::fs::read(path).await
            }
            Backend::Bucket { store, prefix } => {
                let got = store
                    .get(&Self::object(prefix, id))
                    .await
                    .map_err(bucket_error)?;
                if got.meta.size > limit {
                    return Err(too_large());
                }
                Ok(got.bytes().await.map_err(bucket_error)?.to_vec())
            }
        }
    }
}

/// The bucket's client, from `[files.s3]` and, for what it leaves out, the environment.
fn bucket(s3: &S3Config) -> io::Result<AmazonS3> {
    crate::providers::install_crypto();
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_virtual_hosted_style_request(s3.virtual_hosted)
        .with_client_options(
            ClientOptions::new()
                .with_timeout(BUCKET_TIMEOUT)
                .with_connect_timeout(Duration::from_secs(5)),
        );
    if let Some(endpoint) = &s3.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
        builder = builder
            .with_access_key_id(id.expose())
            .with_secret_access_key(secret.expose());
    }
    builder.build().map_err(bucket_error)
}

fn bucket_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

/// Removes the temporary files a crash left in `dir`, creating it if missing.
fn sweep(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Only old ones: another instance sharing the directory may be writing the rest.
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_PART);
        if stale && path.extension().is_some_and(|e| e == &PART[1..]) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

/// Counts and hashes a body's chunks, refusing past `limit` bytes.
struct Tally {
    hasher: Sha256,
    bytes: u64,
    limit: u64,
}

impl Tally {
    fn new(limit: u64) -> Tally {
        Tally {
            hasher: Sha256::new(),
            bytes: 0,
            limit,
        }
    }

    fn add(&mut self, chunk: &[u8]) -> Result<(), WriteError> {
        self.bytes += chunk.len() as u64;
        if self.bytes > self.limit {
            return Err(WriteError::TooLarge(self.limit));
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn end(self) -> (u64, String) {
        (self.bytes, crate::auth::hex(&self.hasher.finalize()))
    }
}

async fn write_to_disk<S, E>(
    tmp: &Path,
    body: S,
    limit: u64,
) -> Result<(tokio::fs::File, u64, String), WriteError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(tmp).await?;
    let mut tally = Tally::new(limit);
    let mut pending: Vec<u8> = Vec::with_capacity(WRITE_BUFFER);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
        tally.add(&chunk)?;
        pending.extend_from_slice(&chunk);
        if pending.len() >= WRITE_BUFFER {
            file.write_all(&pending).await?;
            pending.clear();
        }
    }
    file.write_all(&pending).await?;
    file.flush().await?;
    let (bytes, sha256) = tally.end();
    Ok((file, bytes, sha256))
}

async fn write_to_bucket<S, E>(
    upload: &mut WriteMultipart,
    body: S,
    limit: u64,
) -> Result<(u64, String), WriteError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut tally = Tally::new(limit);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
        tally.add(&chunk)?;
        // Back pressure: the body is read no faster than parts go up.
        upload
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(bucket_error)?;
        upload.put(chunk);
    }
    Ok(tally.end())
}

/// Syncs a directory, so a rename in it survives a crash.
async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

/// A new file id, as OpenAI spells them (`file-` then hex).
pub fn new_file_id() -> String {
    let id = crate::wire::responses::new_id("file");
    format!("file-{}", &id[5..])
}

/// Whether `id` looks like one of our file ids.
pub fn is_file_id(id: &str) -> bool {
    id.len() > 5
        && id.len() <= 128
        && id.starts_with("file-")
        && id[5..].bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The media type of a file by its name's extension, for inline data URLs.
pub fn media_type(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "txt" | "md" => "text/plain",
        "json" => "application/json",
        "jsonl" => "application/jsonl",
        "csv" => "text/csv",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        let id = new_file_id();
        assert!(is_file_id(&id), "{id}");
        for bad in [
            "file-",
            "file-../x",
            "file_abc",
            "file-a%2e",
            "resp_abc",
            "file-a\0",
        ] {
            assert!(!is_file_id(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn writes_hash_and_limit() {
        let dir = std::env::temp_dir().join(new_file_id());
        let config = FilesConfig {
            dir: dir.clone(),
            ..FilesConfig::default()
        };
        std::fs::create_dir_all(&dir).unwrap();
        let left = std::fs::File::create(dir.join(".left.part")).unwrap();
        left.set_modified(std::time::SystemTime::now() - STALE_PART)
            .unwrap();
        drop(left);
        std::fs::write(dir.join(".writing.part"), b"x").unwrap();
        let files = FileStore::open(&config).unwrap();
        assert!(
            !dir.join(".left.part").exists(),
            "a crash's leftovers are removed"
        );
        assert!(
            dir.join(".writing.part").exists(),
            "another instance's upload in progress is not"
        );
        std::fs::remove_file(dir.join(".writing.part")).unwrap();
        let chunks = || {
            futures_util::stream::iter(
                [&b"hello "[..], b"world"].map(|c| Ok::<_, io::Error>(Bytes::from_static(c))),
            )
        };
        let written = files.write(chunks(), 1024).await.unwrap();
        let id = written.id.clone();
        assert_eq!(written.bytes, 11);
        assert_eq!(
            written.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        files.keep(written).await.unwrap();
        assert_eq!(std::fs::read(dir.join(&id)).unwrap(), b"hello world");
        assert!(matches!(
            files.write(chunks(), 5).await,
            Err(WriteError::TooLarge(5))
        ));
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "a refused upload leaves nothing behind");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
