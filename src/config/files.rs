//! `[files]`: where uploaded files live (a directory, or an S3-compatible bucket) and how
//! large each purpose's may be; `[batches]`: how the Batch API runs its lines.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret};

const MIB: u64 = 1024 * 1024;

/// `[files]` settings; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// The directory files are written to (created if missing). Instances that share a
    /// PostgreSQL database must share this directory too.
    pub dir: PathBuf,
    /// When set, files live in this S3-compatible bucket instead of `dir`.
    pub s3: Option<S3Config>,
    /// The largest file of purpose `batch` (and the largest batch output file).
    pub max_batch_bytes: u64,
    /// The largest file of purpose `vision`.
    pub max_vision_bytes: u64,
    /// The largest file of purpose `user_data`.
    pub max_user_data_bytes: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            dir: PathBuf::from("switchyard-files"),
            s3: None,
            max_batch_bytes: 200 * MIB,
            max_vision_bytes: 20 * MIB,
            max_user_data_bytes: 512 * MIB,
        }
    }
}

impl FilesConfig {
    /// The size limit of a purpose a client may upload, or `None` for one it may not.
    pub fn limit_of(&self, purpose: &str) -> Option<u64> {
        match purpose {
            "batch" => Some(self.max_batch_bytes),
            "vision" => Some(self.max_vision_bytes),
            "user_data" => Some(self.max_user_data_bytes),
            _ => None,
        }
    }

    /// The largest upload of any purpose: what the listener lets `POST /v1/files` declare.
    pub fn max_upload_bytes(&self) -> u64 {
        self.max_batch_bytes
            .max(self.max_vision_bytes)
            .max(self.max_user_data_bytes)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("files: {what}")));
        if self.dir.as_os_str().is_empty() {
            return bad("dir must not be empty");
        }
        if let Some(s3) = &self.s3 {
            s3.validate()?;
        }
        for (name, value) in [
            ("max_batch_bytes", self.max_batch_bytes),
            ("max_vision_bytes", self.max_vision_bytes),
            ("max_user_data_bytes", self.max_user_data_bytes),
        ] {
            if !(1024..=64 * 1024 * MIB).contains(&value) {
                return bad(&format!("{name} must be between 1 KiB and 64 GiB"));
            }
        }
        Ok(())
    }
}

/// `[files.s3]`: an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, Ceph, …).
///
/// Credentials left out are taken the AWS way: `AWS_ACCESS_KEY_ID` /
/// `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, a web identity token, or the instance's
/// metadata service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// The store's base URL for anything but AWS, e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Prepended to every object name, e.g. `switchyard/files/`.
    #[serde(default)]
    pub prefix: String,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    /// `https://bucket.host/key` instead of `https://host/bucket/key`. Off by default, as
    /// most S3-compatible stores expect the bucket in the path.
    #[serde(default)]
    pub virtual_hosted: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

impl S3Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("files.s3: {what}")));
        if self.bucket.is_empty() || self.bucket.contains('/') {
            return bad("bucket must be a bucket name");
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return bad("endpoint must be an http:// or https:// URL");
        }
        if self.prefix.starts_with('/') {
            return bad("prefix must not start with '/'");
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return bad("access_key_id and secret_access_key go together");
        }
        Ok(())
    }
}

/// `[batches]` settings; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchesConfig {
    /// Lines of one batch run at once.
    pub concurrency: usize,
    /// The most lines an input file may hold.
    pub max_lines: usize,
    /// A batch line starts only while the global admission queue has no waiters and at
    /// most this share of its slots in use, so batches take what interactive traffic
    /// leaves.
    pub max_admission_share: f64,
    /// While interactive requests are being served on a busy CPU, a batch runs one line
    /// at a time and rests after each as long as it took (see `batches::pace`).
    pub yield_cpu: bool,
}

impl Default for BatchesConfig {
    fn default() -> Self {
        BatchesConfig {
            concurrency: 8,
            max_lines: 50_000,
            max_admission_share: 0.5,
            yield_cpu: true,
        }
    }
}

impl BatchesConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("batches: {what}")));
        if self.concurrency == 0 || self.concurrency > 1024 {
            return bad("concurrency must be 1-1024");
        }
        if self.max_lines == 0 || self.max_lines > 1_000_000 {
            return bad("max_lines must be 1-1000000");
        }
        if !(self.max_admission_share > 0.0 && self.max_admission_share <= 1.0) {
            return bad("max_admission_share must be above 0 and at most 1");
        }
        Ok(())
    }
}
