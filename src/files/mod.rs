//! Uploaded files on disk: the bytes under `[files] dir`, named by file id.
//!
//! An upload is streamed into a temporary file in the same directory while its SHA-256 is
//! computed and its size checked against the purpose's limit, so no file is ever held in
//! memory whole. Once complete it is synced, renamed to its id and the directory synced:
//! only then is the row written ([`crate::store::files`]), so a file a client was told
//! about survives a crash. Temporary files a crash left behind are removed at start.
//! File I/O goes through tokio's blocking pool, never the runtime's threads.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::FilesConfig;

/// The suffix of a file still being written.
const PART: &str = ".part";
/// A temporary file untouched this long was left by a crash (uploads that stall are cut
/// off by the body read timeout long before).
const STALE_PART: std::time::Duration = std::time::Duration::from_secs(3600);
/// Bytes gathered before a write to disk.
const WRITE_BUFFER: usize = 256 * 1024;

/// The file directory.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    pub config: FilesConfig,
}

/// Bytes written to a temporary file, not yet kept.
#[derive(Debug)]
pub struct Written {
    tmp: PathBuf,
    file: tokio::fs::File,
    pub bytes: u64,
    pub sha256: String,
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
    /// Opens (creating) the directory and removes what a crash left half-written.
    ///
    /// # Errors
    /// When the directory cannot be created or read.
    pub fn open(config: &FilesConfig) -> io::Result<FileStore> {
        std::fs::create_dir_all(&config.dir)?;
        // Only old ones: another instance sharing the directory may be writing the rest.
        for entry in std::fs::read_dir(&config.dir)? {
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
        Ok(FileStore {
            dir: config.dir.clone(),
            config: config.clone(),
        })
    }

    /// Where file `id` lives. Ids are ours (`file-` and hex), checked before they get here.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Writes `body` to a temporary file, hashing it, refusing past `limit` bytes.
    ///
    /// # Errors
    /// [`WriteError::TooLarge`] past the limit, [`WriteError::Body`] when the body fails,
    /// [`WriteError::Io`] when the disk does; the temporary file is removed.
    pub async fn write<S, E>(&self, body: S, limit: u64) -> Result<Written, WriteError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let tmp = self.dir.join(format!(
            ".{}{PART}",
            crate::wire::responses::new_id("upload")
        ));
        let result = write_to(&tmp, body, limit).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Makes a written file durable as `id`: synced, renamed, the directory synced.
    ///
    /// # Errors
    /// When the disk fails; the temporary file is removed.
    pub async fn keep(&self, written: Written, id: &str) -> io::Result<()> {
        let Written { tmp, file, .. } = written;
        let kept = async {
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&tmp, self.path(id)).await?;
            sync_dir(&self.dir).await
        }
        .await;
        if kept.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        kept
    }

    /// Drops a written file that will not be kept.
    pub async fn discard(&self, written: Written) {
        drop(written.file);
        let _ = tokio::fs::remove_file(&written.tmp).await;
    }

    /// Removes file `id`'s bytes (its row is gone already); a missing file is no error.
    pub async fn remove(&self, id: &str) {
        if let Err(e) = tokio::fs::remove_file(self.path(id)).await
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(file = id, error = %e, "files: removing failed");
        }
    }

    /// Opens file `id` for reading.
    ///
    /// # Errors
    /// When it is missing or unreadable.
    pub async fn open_file(&self, id: &str) -> io::Result<tokio::fs::File> {
        tokio::fs::File::open(self.path(id)).await
    }

    /// Reads file `id` whole, refusing past `limit` bytes (for parts sent upstream inline).
    ///
    /// # Errors
    /// When it is missing, unreadable or too large.
    pub async fn read(&self, id: &str, limit: u64) -> io::Result<Vec<u8>> {
        let path = self.path(id);
        let size = tokio::fs::metadata(&path).await?.len();
        if size > limit {
            return Err(io::Error::other(format!("larger than {limit} bytes")));
        }
        tokio::fs::read(path).await
    }
}

async fn write_to<S, E>(tmp: &Path, body: S, limit: u64) -> Result<Written, WriteError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(tmp).await?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut pending: Vec<u8> = Vec::with_capacity(WRITE_BUFFER);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
        bytes += chunk.len() as u64;
        if bytes > limit {
            return Err(WriteError::TooLarge(limit));
        }
        hasher.update(&chunk);
        pending.extend_from_slice(&chunk);
        if pending.len() >= WRITE_BUFFER {
            file.write_all(&pending).await?;
            pending.clear();
        }
    }
    file.write_all(&pending).await?;
    file.flush().await?;
    Ok(Written {
        tmp: tmp.to_path_buf(),
        file,
        bytes,
        sha256: crate::auth::hex(&hasher.finalize()),
    })
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
        assert_eq!(written.bytes, 11);
        assert_eq!(
            written.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        files.keep(written, "file-abc").await.unwrap();
        assert_eq!(std::fs::read(dir.join("file-abc")).unwrap(), b"hello world");
        assert!(matches!(
            files.write(chunks(), 5).await,
            Err(WriteError::TooLarge(5))
        ));
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "a refused upload leaves nothing behind");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
