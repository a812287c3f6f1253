//! S3 behind `Ledger`: job records with conditional writes (If-Match /
//! If-None-Match), so two deliveries of one message can never both act.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;

use super::cloud_error;
use crate::error::{CloudError, RetryClass};
use crate::ports::{ActiveJobs, CloudResult, Listing, Objects, Records, SharedState, Versioned, WriteOutcome};
use crate::record::{active_key, record_key, JobRecord};

pub struct S3Ledger {
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Ledger {
    pub fn new(s3: aws_sdk_s3::Client, bucket: String) -> Self {
        S3Ledger { s3, bucket }
    }

    async fn put_record(&self, record: &JobRecord, if_match: Option<&str>) -> CloudResult<WriteOutcome> {
        let body = serde_json::to_vec(record).map_err(|e| CloudError::Invalid(e.to_string()))?;
        self.put_conditional(&record_key(&record.job_id), body, if_match).await
    }

    /// If-Match `version`, or If-None-Match `*` without one.
    async fn put_conditional(&self, key: &str, body: Vec<u8>, if_match: Option<&str>) -> CloudResult<WriteOutcome> {
        let mut call = self
            .s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            // The bucket policy denies unencrypted writes.
            .server_side_encryption(ServerSideEncryption::Aes256)
            .body(ByteStream::from(body));
        call = match if_match {
            Some(version) => call.if_match(version),
            None => call.if_none_match("*"),
        };
        match call.send().await {
            Ok(output) => Ok(WriteOutcome::Written { version: output.e_tag().unwrap_or_default().to_string() }),
            Err(e) => {
                let err = cloud_error("s3", "PutObject", e);
                match &err {
                    // 412: someone else wrote; 409: a concurrent conditional write is in flight.
                    CloudError::Api { code, .. }
                        if code == "PreconditionFailed" || code == "ConditionalRequestConflict" =>
                    {
                        Ok(WriteOutcome::Conflict)
                    }
                    // If-Match on a missing key: the record vanished underneath.
                    CloudError::Api { code, .. } if if_match.is_some() && code == "NoSuchKey" => {
                        Ok(WriteOutcome::Conflict)
                    }
                    _ => Err(err),
                }
            }
        }
    }
}

#[async_trait]
impl Records for S3Ledger {
    async fn load(&self, job_id: &str) -> CloudResult<Option<Versioned>> {
        let Some((body, version)) = self.get_with_etag(&record_key(job_id)).await? else {
            return Ok(None);
        };
        let record: JobRecord = serde_json::from_slice(&body)
            .map_err(|e| CloudError::Invalid(format!("job record {job_id} is not valid JSON: {e}")))?;
        Ok(Some(Versioned { record, version }))
    }

    async fn create(&self, record: &JobRecord) -> CloudResult<WriteOutcome> {
        self.put_record(record, None).await
    }

    async fn replace(&self, record: &JobRecord, version: &str) -> CloudResult<WriteOutcome> {
        self.put_record(record, Some(version)).await
    }
}

#[async_trait]
impl Objects for S3Ledger {
    async fn put_artifact(&self, job_id: &str, name: &str, body: &[u8], content_type: &str) -> CloudResult<()> {
        self.put(&format!("jobs/{job_id}/{name}"), body, content_type).await
    }

    async fn put(&self, key: &str, body: &[u8], content_type: &str) -> CloudResult<()> {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .server_side_encryption(ServerSideEncryption::Aes256)
            .body(ByteStream::from(body.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("s3", "PutObject", e))
    }

    async fn get(&self, key: &str) -> CloudResult<Option<Vec<u8>>> {
        Ok(self.get_with_etag(key).await?.map(|(body, _)| body))
    }

    async fn delete(&self, key: &str) -> CloudResult<()> {
        self.s3
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("s3", "DeleteObject", e))
    }

    fn bucket(&self) -> &str {
        &self.bucket
    }
}

#[async_trait]
impl ActiveJobs for S3Ledger {
    async fn set_active(&self, job_id: &str, active: bool) -> CloudResult<()> {
        if active {
            self.s3
                .put_object()
                .bucket(&self.bucket)
                .key(active_key(job_id))
                .server_side_encryption(ServerSideEncryption::Aes256)
                .body(ByteStream::from_static(b""))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| cloud_error("s3", "PutObject", e))
        } else {
            self.s3
                .delete_object()
                .bucket(&self.bucket)
                .key(active_key(job_id))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| cloud_error("s3", "DeleteObject", e))
        }
    }

    async fn list_active(&self) -> CloudResult<Vec<String>> {
        let mut pages = self.s3.list_objects_v2().bucket(&self.bucket).prefix("active/").into_paginator().send();
        let mut jobs = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| cloud_error("s3", "ListObjectsV2", e))?;
            for object in page.contents() {
                if let Some(job_id) = object.key().and_then(|k| k.strip_prefix("active/")) {
                    jobs.push(job_id.to_string());
                }
            }
        }
        Ok(jobs)
    }
}

#[async_trait]
impl SharedState for S3Ledger {
    async fn get_versioned(&self, key: &str) -> CloudResult<Option<(Vec<u8>, String)>> {
        self.get_with_etag(key).await
    }

    async fn put_if(&self, key: &str, body: &[u8], version: Option<&str>) -> CloudResult<WriteOutcome> {
        self.put_conditional(key, body.to_vec(), version).await
    }
}

#[async_trait]
impl Listing for S3Ledger {
    async fn list_keys(&self, bucket: &str, prefix: &str, most: usize) -> CloudResult<Option<Vec<String>>> {
        let mut pages = self.s3.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| cloud_error("s3", "ListObjectsV2", e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key()).map(str::to_string));
            if keys.len() > most {
                return Ok(None);
            }
        }
        Ok(Some(keys))
    }
}

impl S3Ledger {
    async fn get_with_etag(&self, key: &str) -> CloudResult<Option<(Vec<u8>, String)>> {
        match self.s3.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(output) => {
                let version = output.e_tag().unwrap_or_default().to_string();
                let body = output
                    .body
                    .collect()
                    .await
                    .map_err(|e| {
                        CloudError::classified("s3", "GetObject", "", &e.to_string(), Some(RetryClass::Transient))
                    })?
                    .into_bytes()
                    .to_vec();
                Ok(Some((body, version)))
            }
            Err(e) => {
                let err = cloud_error("s3", "GetObject", e);
                if err.class() == RetryClass::NotFound {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }
}
