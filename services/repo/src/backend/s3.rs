//! A repository in an S3 bucket (AWS S3, Garage, MinIO, any S3-compatible store).
//!
//! Object keys are `<prefix>/<key>` in the bucket (`<key>` when the prefix is empty).
//!
//! Client settings, chosen for S3-compatible stores:
//! - a custom endpoint and path-style addressing (`http://host:3900/bucket/key`);
//! - `RequestChecksumCalculation::WhenRequired` and `ResponseChecksumValidation::WhenRequired`:
//!   the SDK's default flexible checksums break several S3-compatible servers. Integrity does not
//!   depend on them: the repository records the SHA3-256 of every sealed object and checks it
//!   after upload and on every read;
//! - static credentials when given, otherwise the usual AWS chain (`AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, profiles, instance roles);
//! - connect and per-attempt timeouts.
//!
//! Retries are ours, not the SDK's (its retry layer is disabled), so that every attempt is
//! logged and the final error names the endpoint, bucket and key: 5xx answers, 408/429,
//! `SlowDown` and other throttling codes, timeouts, connection failures and truncated responses
//! are retried with exponential backoff and full jitter, up to `max_attempts` attempts; then the
//! operation fails with [`RepoError::Unreachable`]. 4xx answers other than those fail at once
//! ([`RepoError::NotFound`] for a missing object, [`RepoError::Refused`] otherwise).
//!
//! Objects larger than `multipart_threshold` are uploaded in parts of `part_size` bytes
//! (at most `part_concurrency` at a time, each part retried on its own); a failed multipart
//! upload is aborted so that it leaves no parts behind. Part bodies are slices of the caller's
//! buffer: no copy.
//!
//! # Object lock (`S3Settings::object_lock`, compliance mode)
//! - **Open**: [`S3Backend::check_object_lock`] (GetObjectLockConfiguration) must find object
//!   lock enabled on the bucket; a bucket created without it (`ObjectLockConfigurationNotFound`)
//!   and a store without the API (Garage: `501 NotImplemented`) fail with
//!   [`RepoError::ObjectLockUnavailable`] before anything is written.
//! - **Writes**: every object is uploaded with `ObjectLockMode::Compliance` and a retain-until
//!   date of now + the period (the store's clock enforces it; the date is rounded up to the
//!   second), except GC's pending lists under `gc/` (bookkeeping no restore reads, rewritten and
//!   deleted by every prune). S3 refuses a locked upload without a checksum, so those requests
//!   (PutObject, UploadPart) carry a CRC32 the SDK computes for them alone; the client keeps
//!   `RequestChecksumCalculation::WhenRequired` for everything else. A multipart upload gets its
//!   lock at CreateMultipartUpload, and is confirmed (HeadObject, then PutObjectRetention if the
//!   store ignored it, as moto does) after completion.
//! - **Deletes**: object lock implies versioning, where a plain DeleteObject only adds a delete
//!   marker: the data stays, hidden, and a restore would see it missing. So under object lock a
//!   delete removes every version of the key by version id, older ones first and the current
//!   one last. A version still retained answers 403 `AccessDenied`, the same code as a missing
//!   permission, so its lock is read (HeadObject of that version) before the refusal is
//!   reported: [`RepoError::Locked`] while retained or under legal hold, otherwise
//!   [`RepoError::Refused`]. The object is then still there and readable; garbage collection
//!   keeps it listed and retries after its date. Consequence: nothing the repository writes can
//!   be deleted through it before its date (prune, forget, a stolen key alike), and once the date
//!   has passed a delete really frees the space, without a lifecycle rule. Needed permissions:
//!   `s3:ListBucketVersions`, `s3:DeleteObjectVersion`, `s3:GetObjectRetention`,
//!   `s3:PutObjectRetention`.
//! - **Extension**: [`Backend::extend_lock`] reads the current version's date (HeadObject) and
//!   moves it later with PutObjectRetention when needed, never earlier (compliance mode forbids
//!   it). `Repository::extend_locks` (`lock.rs`) calls it for everything still needed.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockEnabled,
    ObjectLockLegalHoldStatus, ObjectLockMode, ObjectLockRetention, ObjectLockRetentionMode,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use rand::Rng;
use tracing::{debug, warn};

use super::{Backend, LockExtension, ObjectMeta, validate_key};
use crate::error::{RepoError, Result};

/// The shortest `object_lock` accepted: the locks of live objects are extended daily.
const MIN_LOCK_PERIOD: Duration = Duration::from_secs(86_400);
/// The longest: a hundred years, far beyond any retention policy (and chrono's range is safe).
const MAX_LOCK_PERIOD: Duration = Duration::from_secs(36_500 * 86_400);

/// Keys written unlocked even under object lock: garbage collection's pending lists are
/// bookkeeping that a restore never reads, rewritten and deleted by every prune; locking them
/// would only make prune fail on its own lists.
const UNLOCKED_PREFIXES: [&str; 1] = ["gc/"];

/// A retain-until date as S3 takes it: whole seconds, rounded up (moto parses only
/// `YYYY-MM-DDTHH:MM:SSZ` with at most microseconds, and a date is never made earlier).
fn to_s3_date(t: DateTime<Utc>) -> aws_smithy_types::DateTime {
    let secs = t.timestamp() + i64::from(t.timestamp_subsec_nanos() > 0);
    aws_smithy_types::DateTime::from_secs(secs)
}

fn from_s3_date(t: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())
}

/// A per-request override that makes the SDK compute the CRC32 of the body even though the
/// client only computes checksums when an operation requires them: S3 refuses an object-lock
/// upload without a checksum, and the SDK alone would send the algorithm header but no value.
fn with_checksum() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default()
        .request_checksum_calculation(RequestChecksumCalculation::WhenSupported)
}

/// What one attempt to delete an object version came to.
enum VersionDelete {
    Done,
    /// HTTP 403: a lock, or missing permissions; [`S3Backend::denied_delete`] tells which.
    Denied(String),
}

/// What the bucket's object-lock configuration says.
enum LockSupport {
    Enabled,
    Unavailable(String),
}

/// How to reach an S3 bucket. `Default` gives path-style addressing, the AWS credential chain,
/// 16 MiB multipart threshold, 8 MiB parts, 6 attempts and a 10 s connect timeout.
#[derive(Clone)]
pub struct S3Settings {
    /// `http://127.0.0.1:3900`; `None` uses `AWS_ENDPOINT_URL(_S3)` or AWS itself.
    pub endpoint: Option<String>,
    /// `None` uses `AWS_REGION` / `AWS_DEFAULT_REGION`, then `us-east-1`.
    pub region: Option<String>,
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`.
    pub prefix: String,
    pub path_style: bool,
    /// Static credentials; when `None` the AWS credential chain is used.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub session_token: Option<String>,
    pub multipart_threshold: usize,
    pub part_size: usize,
    pub part_concurrency: usize,
    /// Attempts per request (1 = no retry).
    pub max_attempts: u32,
    /// First backoff delay; doubles per attempt up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Limit for one attempt of one request (a part, a small object).
    pub attempt_timeout: Duration,
    /// S3 object lock, compliance mode: every object written (except `gc/` bookkeeping) is
    /// locked until now + this period, and deletes remove object versions (see the module
    /// documentation). At least one day. `None`: objects are written unlocked.
    pub object_lock: Option<Duration>,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: None,
            region: None,
            bucket: String::new(),
            prefix: String::new(),
            path_style: true,
            access_key: None,
            secret_key: None,
            session_token: None,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            part_concurrency: 4,
            max_attempts: 6,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(300),
            object_lock: None,
        }
    }
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("access_key", &self.access_key)
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .field("max_attempts", &self.max_attempts)
            .field("object_lock", &self.object_lock)
            .finish_non_exhaustive()
    }
}

pub struct S3Backend {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    settings: S3Settings,
}

/// The outcome of one failed attempt.
enum Failure {
    Transient(String),
    Fatal(RepoError),
}

impl S3Backend {
    /// Builds the client. Nothing is sent yet: an unreachable endpoint shows on the first request.
    pub async fn connect(settings: S3Settings) -> Result<S3Backend> {
        if settings.bucket.is_empty() {
            return Err(RepoError::Config("S3 bucket name is empty".into()));
        }
        if settings.part_size < 5 << 20 {
            return Err(RepoError::Config(
                "S3 part size must be at least 5 MiB (an S3 limit)".into(),
            ));
        }
        if let Some(period) = settings.object_lock
            && !(MIN_LOCK_PERIOD..=MAX_LOCK_PERIOD).contains(&period)
        {
            return Err(RepoError::Config(format!(
                "object_lock is {}s; it must be between 1d and 36500d (30d is typical): the \
                 locks of live objects are extended by a daily job, and a shorter lock would \
                 lapse in between",
                period.as_secs()
            )));
        }
        let region = settings
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_string());
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout)
            .operation_attempt_timeout(settings.attempt_timeout)
            .build();

        let mut builder = match (&settings.access_key, &settings.secret_key) {
            (Some(ak), Some(sk)) => aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .credentials_provider(Credentials::new(
                    ak.clone(),
                    sk.clone(),
                    settings.session_token.clone(),
                    None,
                    "backstop-config",
                )),
            (None, None) => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(region.clone()));
                if let Some(ep) = &settings.endpoint {
                    loader = loader.endpoint_url(ep.clone());
                }
                let shared = loader.load().await;
                aws_sdk_s3::config::Builder::from(&shared)
            }
            _ => {
                return Err(RepoError::Config(
                    "S3 credentials: give both the access key and the secret key, or neither \
                     (to use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
                        .into(),
                ));
            }
        };
        builder = builder
            .region(Region::new(region.clone()))
            .force_path_style(settings.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(ep) = &settings.endpoint {
            builder = builder.endpoint_url(ep.clone());
        }
        let config = builder.build();
        let endpoint = settings
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .unwrap_or_else(|| format!("AWS S3 ({region})"));
        Ok(S3Backend {
            client: Client::from_conf(config),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.trim_matches('/').to_string(),
            endpoint,
            settings,
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.prefix, key)
        }
    }

    fn what(&self, op: &str, key: &str) -> String {
        format!(
            "{op} s3://{}/{} at {}",
            self.bucket,
            self.full_key(key),
            self.endpoint
        )
    }

    fn classify<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let detail = DisplayErrorContext(&err).to_string();
        match &err {
            SdkError::ConstructionFailure(_) => Failure::Fatal(RepoError::Config(format!(
                "cannot build the request to {}: {detail}",
                self.what(op, key)
            ))),
            SdkError::DispatchFailure(d) if d.is_user() => Failure::Fatal(RepoError::Refused {
                what: self.what(op, key),
                detail,
                check: "the endpoint URL and TLS settings".into(),
            }),
            SdkError::ServiceError(s) => {
                let status = s.raw().status().as_u16();
                let code = s.err().code().unwrap_or("");
                let throttled = matches!(
                    code,
                    "SlowDown"
                        | "RequestTimeout"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "Throttling"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                );
                if status >= 500 || status == 408 || status == 429 || throttled {
                    Failure::Transient(format!("HTTP {status} {code}: {detail}"))
                } else if status == 404 && code != "NoSuchBucket" && code != "NoSuchUpload" {
                    Failure::Fatal(RepoError::NotFound {
                        key: key.to_string(),
                        location: self.describe(),
                        backup: None,
                    })
                } else {
                    let check = match (status, code) {
                        (_, "NoSuchBucket") => format!(
                            "that the bucket {} exists at {} (create it first)",
                            self.bucket, self.endpoint
                        ),
                        (403, _) | (_, "AccessDenied") | (_, "InvalidAccessKeyId") => {
                            "the access key, the secret key and the bucket's permissions".into()
                        }
                        (301, _)
                        | (_, "PermanentRedirect")
                        | (_, "AuthorizationHeaderMalformed") => {
                            "the region setting (it must match the bucket's region)".into()
                        }
                        _ => "the request and the store's logs".into(),
                    };
                    Failure::Fatal(RepoError::Refused {
                        what: self.what(op, key),
                        detail: format!("HTTP {status} {code}: {detail}"),
                        check,
                    })
                }
            }
            // Timeouts, connection failures, truncated or unparseable responses.
            _ => Failure::Transient(detail),
        }
    }

    async fn with_retry<T, F, Fut>(&self, op: &str, key: &str, mut attempt_fn: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Failure>>,
    {
        let max = self.settings.max_attempts.max(1);
        let mut attempt = 1u32;
        loop {
            match attempt_fn().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(detail)) => {
                    if attempt >= max {
                        return Err(RepoError::Unreachable {
                            what: self.what(op, key),
                            detail: format!(
                                "failed after {attempt} attempts; last error: {detail}"
                            ),
                            check: format!(
                                "that {} is up and reachable from this host, the network, and the store's health",
                                self.endpoint
                            ),
                        });
                    }
                    let cap = self
                        .settings
                        .base_backoff
                        .saturating_mul(1u32 << (attempt - 1).min(16))
                        .min(self.settings.max_backoff);
                    // Full jitter: spreads retries of many parallel uploads apart.
                    let delay = cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
                    warn!(
                        op,
                        key,
                        attempt,
                        max,
                        delay_ms = delay.as_millis() as u64,
                        error = %detail,
                        "S3 request failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// The retain-until date of an object written now under `key`, when it is to be locked.
    fn new_lock_until(&self, key: &str) -> Option<aws_smithy_types::DateTime> {
        let period = self.settings.object_lock?;
        if UNLOCKED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            return None;
        }
        // The period is bounded by `connect`; the store compares the date with its own clock.
        let period = chrono::Duration::from_std(period).unwrap_or(chrono::Duration::MAX);
        Some(to_s3_date(
            Utc::now()
                .checked_add_signed(period)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        ))
    }

    async fn put_single(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full_key(key);
        let lock = self.new_lock_until(key);
        self.with_retry("put", key, || {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .content_length(data.len() as i64)
                .body(ByteStream::from(data.clone()));
            if let Some(until) = lock {
                req = req
                    .object_lock_mode(ObjectLockMode::Compliance)
                    .object_lock_retain_until_date(until)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32);
            }
            let mut req = req.customize();
            if lock.is_some() {
                req = req.config_override(with_checksum());
            }
            async move {
                req.send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.classify("put", key, e))
            }
        })
        .await
    }

    async fn put_multipart(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full_key(key);
        let lock = self.new_lock_until(key);
        let upload_id = self
            .with_retry("create multipart upload", key, || {
                let mut req = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full);
                if let Some(until) = lock {
                    // Every part then carries its CRC32, and the completion lists them.
                    req = req
                        .object_lock_mode(ObjectLockMode::Compliance)
                        .object_lock_retain_until_date(until)
                        .checksum_algorithm(ChecksumAlgorithm::Crc32);
                }
                async move {
                    req.send()
                        .await
                        .map_err(|e| self.classify("create multipart upload", key, e))
                }
            })
            .await?
            .upload_id
            .ok_or_else(|| RepoError::Refused {
                what: self.what("create multipart upload", key),
                detail: "the store returned no upload id".into(),
                check: "that the store supports multipart uploads".into(),
            })?;

        let result = self
            .upload_parts(key, &full, &upload_id, &data, lock.is_some())
            .await;
        match result {
            Ok(parts) => {
                let completed = CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build();
                let done = self
                    .with_retry("complete multipart upload", key, || {
                        let req = self
                            .client
                            .complete_multipart_upload()
                            .bucket(&self.bucket)
                            .key(&full)
                            .upload_id(&upload_id)
                            .multipart_upload(completed.clone());
                        async move {
                            req.send()
                                .await
                                .map(|_| ())
                                .map_err(|e| self.classify("complete multipart upload", key, e))
                        }
                    })
                    .await;
                if done.is_err() {
                    self.abort_multipart(&full, &upload_id).await;
                    return done;
                }
                if let Some(until) = lock {
                    // S3 applies the lock given at CreateMultipartUpload; some stores (moto)
                    // ignore it there. One HeadObject confirms it, and sets it if it is absent.
                    self.retain_until(key, until).await?;
                }
                done
            }
            Err(e) => {
                self.abort_multipart(&full, &upload_id).await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        data: &Bytes,
        checksummed: bool,
    ) -> Result<Vec<CompletedPart>> {
        let part_size = self.settings.part_size;
        let n_parts = data.len().div_ceil(part_size);
        let mut parts: Vec<CompletedPart> = futures::stream::iter(0..n_parts)
            .map(|i| {
                let body = data.slice(i * part_size..((i + 1) * part_size).min(data.len()));
                let number = (i + 1) as i32;
                async move {
                    let what = format!("upload part {number}");
                    let out = self
                        .with_retry(&what, key, || {
                            let mut req = self
                                .client
                                .upload_part()
                                .bucket(&self.bucket)
                                .key(full)
                                .upload_id(upload_id)
                                .part_number(number)
                                .content_length(body.len() as i64)
                                .body(ByteStream::from(body.clone()));
                            if checksummed {
                                req = req.checksum_algorithm(ChecksumAlgorithm::Crc32);
                            }
                            let mut req = req.customize();
                            if checksummed {
                                req = req.config_override(with_checksum());
                            }
                            let what = what.clone();
                            async move { req.send().await.map_err(|e| self.classify(&what, key, e)) }
                        })
                        .await?;
                    Ok::<_, RepoError>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag)
                            .set_checksum_crc32(out.checksum_crc32)
                            .build(),
                    )
                }
            })
            .buffer_unordered(self.settings.part_concurrency.max(1))
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number);
        Ok(parts)
    }

    async fn abort_multipart(&self, full: &str, upload_id: &str) {
        let res = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = res {
            warn!(key = full, error = %DisplayErrorContext(&e), "could not abort a failed multipart upload; the store may keep its parts until a lifecycle rule removes them");
        }
    }
}

/// Object lock: the bucket check, version deletes and retention.
impl S3Backend {
    /// Reads the bucket's object-lock configuration (GetObjectLockConfiguration) and fails with
    /// [`RepoError::ObjectLockUnavailable`] unless object lock is enabled on it: a bucket created
    /// without it, or a store without the API (Garage answers `NotImplemented`). An unreachable
    /// store, a missing bucket or missing permissions fail as for any other request.
    pub async fn check_object_lock(&self) -> Result<()> {
        let op = "read the object-lock configuration of";
        let support = self
            .with_retry(op, "", || {
                let req = self
                    .client
                    .get_object_lock_configuration()
                    .bucket(&self.bucket);
                async move {
                    let err = match req.send().await {
                        Ok(out) => {
                            let enabled = out
                                .object_lock_configuration()
                                .and_then(|c| c.object_lock_enabled());
                            return Ok(if enabled == Some(&ObjectLockEnabled::Enabled) {
                                LockSupport::Enabled
                            } else {
                                LockSupport::Unavailable(format!(
                                    "the bucket {} has an object-lock configuration that does not \
                                     enable object lock",
                                    self.bucket
                                ))
                            });
                        }
                        Err(e) => e,
                    };
                    if let SdkError::ServiceError(s) = &err {
                        let status = s.raw().status().as_u16();
                        let code = s.err().code().unwrap_or("");
                        if code == "ObjectLockConfigurationNotFoundError"
                            || (status == 404 && code != "NoSuchBucket")
                        {
                            return Ok(LockSupport::Unavailable(format!(
                                "the bucket {} was created without object lock (HTTP {status} \
                                 {code})",
                                self.bucket
                            )));
                        }
                        if status == 501 || code == "NotImplemented" {
                            return Ok(LockSupport::Unavailable(format!(
                                "the store does not implement S3 object lock (HTTP {status} {code})"
                            )));
                        }
                    }
                    Err(self.classify(op, "", err))
                }
            })
            .await?;
        match support {
            LockSupport::Enabled => Ok(()),
            LockSupport::Unavailable(detail) => Err(RepoError::ObjectLockUnavailable {
                location: self.describe(),
                detail,
            }),
        }
    }

    /// Every version of exactly `full` (objects and delete markers), with whether it is the
    /// current one.
    async fn versions_of(&self, key: &str, full: &str) -> Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut version_marker: Option<String> = None;
        loop {
            let page = self
                .with_retry("list versions", key, || {
                    let req = self
                        .client
                        .list_object_versions()
                        .bucket(&self.bucket)
                        .prefix(full)
                        .set_key_marker(key_marker.clone())
                        .set_version_id_marker(version_marker.clone());
                    async move {
                        req.send()
                            .await
                            .map_err(|e| self.classify("list versions", key, e))
                    }
                })
                .await?;
            let objects = page
                .versions()
                .iter()
                .map(|v| (v.key(), v.version_id(), v.is_latest()));
            let markers = page
                .delete_markers()
                .iter()
                .map(|m| (m.key(), m.version_id(), m.is_latest()));
            for (k, id, latest) in objects.chain(markers) {
                if k == Some(full)
                    && let Some(id) = id
                {
                    out.push((id.to_string(), latest.unwrap_or(false)));
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() && version_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// A real deletion under object lock: every version of the key, older ones first and the
    /// current one last, so that until the last step the object reads as it did. A locked
    /// version stops it with [`RepoError::Locked`]; the object is then still there.
    async fn delete_versions(&self, key: &str) -> Result<()> {
        let full = self.full_key(key);
        let mut versions = self.versions_of(key, &full).await?;
        versions.sort_by_key(|(_, current)| *current);
        for (version, _) in versions {
            self.delete_version(key, &full, &version).await?;
        }
        Ok(())
    }

    async fn delete_version(&self, key: &str, full: &str, version: &str) -> Result<()> {
        let op = "delete version";
        let res = self
            .with_retry(op, key, || {
                let req = self
                    .client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .version_id(version);
                async move {
                    match req.send().await {
                        Ok(_) => Ok(VersionDelete::Done),
                        Err(e) => {
                            if let SdkError::ServiceError(s) = &e
                                && s.raw().status().as_u16() == 403
                            {
                                return Ok(VersionDelete::Denied(
                                    DisplayErrorContext(&e).to_string(),
                                ));
                            }
                            Err(self.classify(op, key, e))
                        }
                    }
                }
            })
            .await;
        match res {
            Ok(VersionDelete::Done) | Err(RepoError::NotFound { .. }) => Ok(()),
            Ok(VersionDelete::Denied(detail)) => {
                Err(self.denied_delete(key, full, version, detail).await)
            }
            Err(e) => Err(e),
        }
    }

    /// Why a version delete was refused with 403: S3 (and moto) answer `AccessDenied` both for a
    /// version under retention or legal hold and for missing permissions, so the version's lock
    /// is read (HeadObject) rather than the message trusted.
    async fn denied_delete(
        &self,
        key: &str,
        full: &str,
        version: &str,
        detail: String,
    ) -> RepoError {
        let head = self
            .with_retry("head version", key, || {
                let req = self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .version_id(version);
                async move {
                    req.send()
                        .await
                        .map_err(|e| self.classify("head version", key, e))
                }
            })
            .await;
        if let Ok(h) = &head {
            if h.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On) {
                return RepoError::Locked {
                    key: key.to_string(),
                    location: self.describe(),
                    detail: format!("version {version} is under a legal hold"),
                };
            }
            if let Some(until) = h.object_lock_retain_until_date().and_then(from_s3_date)
                && until > Utc::now()
            {
                let mode = h
                    .object_lock_mode()
                    .map(|m| m.as_str().to_lowercase())
                    .unwrap_or_else(|| "retention".into());
                return RepoError::Locked {
                    key: key.to_string(),
                    location: self.describe(),
                    detail: format!("version {version} is retained until {until} ({mode} mode)"),
                };
            }
        }
        RepoError::Refused {
            what: self.what("delete version", key),
            detail: format!("HTTP 403: {detail}; the version is not locked"),
            check: "the key's permissions: deleting under object lock needs \
                    s3:ListBucketVersions, s3:DeleteObjectVersion and s3:GetObjectRetention"
                .into(),
        }
    }
}

#[async_trait]
impl Backend for S3Backend {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        validate_key(key)?;
        if data.len() > self.settings.multipart_threshold {
            debug!(key, size = data.len(), "multipart upload");
            self.put_multipart(key, data).await
        } else {
            self.put_single(key, data).await
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        validate_key(key)?;
        let full = self.full_key(key);
        self.with_retry("get", key, || {
            let req = self.client.get_object().bucket(&self.bucket).key(&full);
            async move {
                let out = req.send().await.map_err(|e| self.classify("get", key, e))?;
                // A body cut off mid-way is a transient failure: read it again.
                out.body
                    .collect()
                    .await
                    .map(|b| b.into_bytes())
                    .map_err(|e| Failure::Transient(format!("reading the body: {e}")))
            }
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        validate_key(key)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let full = self.full_key(key);
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        self.with_retry("get range", key, || {
            let req = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .range(&range);
            async move {
                let out = req
                    .send()
                    .await
                    .map_err(|e| self.classify("get range", key, e))?;
                out.body
                    .collect()
                    .await
                    .map(|b| b.into_bytes())
                    .map_err(|e| Failure::Transient(format!("reading the body: {e}")))
            }
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        validate_key(key)?;
        let full = self.full_key(key);
        let res = self
            .with_retry("head", key, || {
                let req = self.client.head_object().bucket(&self.bucket).key(&full);
                async move { req.send().await.map_err(|e| self.classify("head", key, e)) }
            })
            .await;
        match res {
            Ok(out) => Ok(Some(out.content_length.unwrap_or(0).max(0) as u64)),
            Err(RepoError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{}", self.prefix, prefix)
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .with_retry("list", prefix, || {
                    let req = self
                        .client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(&full_prefix)
                        .set_continuation_token(token.clone());
                    async move {
                        req.send()
                            .await
                            .map_err(|e| self.classify("list", prefix, e))
                    }
                })
                .await?;
            for obj in page.contents() {
                let Some(k) = obj.key() else { continue };
                if k.len() < strip {
                    continue;
                }
                out.push(ObjectMeta {
                    key: k[strip..].to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        if self.settings.object_lock.is_some() {
            // A plain DeleteObject would only add a delete marker over a locked version.
            return self.delete_versions(key).await;
        }
        let full = self.full_key(key);
        let res = self
            .with_retry("delete", key, || {
                let req = self.client.delete_object().bucket(&self.bucket).key(&full);
                async move {
                    req.send()
                        .await
                        .map(|_| ())
                        .map_err(|e| self.classify("delete", key, e))
                }
            })
            .await;
        match res {
            Err(RepoError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{} at {}", self.bucket, self.endpoint)
        } else {
            format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
        }
    }

    fn object_lock(&self) -> Option<Duration> {
        self.settings.object_lock
    }

    async fn extend_lock(&self, key: &str, until: DateTime<Utc>) -> Result<LockExtension> {
        validate_key(key)?;
        if self.settings.object_lock.is_none() {
            return Err(RepoError::ObjectLockUnavailable {
                location: self.describe(),
                detail: "object_lock is not configured for this repository".into(),
            });
        }
        self.retain_until(key, to_s3_date(until)).await
    }
}

impl S3Backend {
    /// Extends the retention of the current version of `key` to `target` unless it is already
    /// retained that long.
    async fn retain_until(
        &self,
        key: &str,
        target: aws_smithy_types::DateTime,
    ) -> Result<LockExtension> {
        let full = self.full_key(key);
        // HeadObject rather than GetObjectRetention: it carries the same date (given the
        // s3:GetObjectRetention permission) and the version id, and moto implements it.
        let head = self
            .with_retry("head", key, || {
                let req = self.client.head_object().bucket(&self.bucket).key(&full);
                async move { req.send().await.map_err(|e| self.classify("head", key, e)) }
            })
            .await?;
        let previous = head.object_lock_retain_until_date().and_then(from_s3_date);
        if let Some(current) = previous
            && target.secs() <= current.timestamp()
        {
            return Ok(LockExtension::AlreadyUntil(current));
        }
        let retention = ObjectLockRetention::builder()
            .mode(ObjectLockRetentionMode::Compliance)
            .retain_until_date(target)
            .build();
        let version = head.version_id.clone();
        self.with_retry("extend the lock of", key, || {
            let req = self
                .client
                .put_object_retention()
                .bucket(&self.bucket)
                .key(&full)
                .set_version_id(version.clone())
                .retention(retention.clone());
            async move {
                req.send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.classify("extend the lock of", key, e))
            }
        })
        .await?;
        Ok(LockExtension::Extended { previous })
    }
}
