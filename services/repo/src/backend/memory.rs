//! An in-memory backend: the whole repository in a map, for fast tests of everything above the
//! storage (use cases, handlers) without a directory or a server. It keeps the trait's
//! invariants (atomic puts, sorted listings, idempotent deletes, validated keys); nothing
//! survives the process. Faults can be injected: [`MemoryBackend::fail_next`] makes the next
//! operations fail as an unreachable store would.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, ObjectMeta, validate_key};
use crate::error::{RepoError, Result};

#[derive(Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, Bytes>>,
    failures: AtomicU32,
}

impl MemoryBackend {
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// The next `n` operations fail with [`RepoError::Unreachable`] (a transient failure).
    pub fn fail_next(&self, n: u32) {
        self.failures.store(n, Ordering::SeqCst);
    }

    /// Replaces an object's bytes behind the repository's back (to simulate damage).
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        match objects.get(key) {
            Some(b) => {
                let mut v = b.to_vec();
                f(&mut v);
                objects.insert(key.to_string(), Bytes::from(v));
                true
            }
            None => false,
        }
    }

    /// Keys of every object, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        // A poisoned lock only means a test panicked while holding it; the map is intact.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, what: &str, key: &str) -> Result<()> {
        validate_key(key)?;
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(RepoError::Unreachable {
                what: format!("{what} {key}"),
                detail: "injected failure".into(),
                check: "the in-memory backend's fail_next".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.check("PUT", key)?;
        self.lock().insert(key.to_string(), data);
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        self.check("PUT", key)?;
        let mut objects = self.lock();
        if objects.contains_key(key) {
            return Ok(false);
        }
        objects.insert(key.to_string(), data);
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.check("GET", key)?;
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| RepoError::NotFound {
                key: key.to_string(),
                location: self.describe(),
                backup: None,
            })
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        self.check("HEAD", key)?;
        Ok(self.lock().get(key).map(|b| b.len() as u64))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.check("LIST", "list")?;
        }
        Ok(self
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.check("DELETE", key)?;
        self.lock().remove(key);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_backend_invariants() {
        let b = MemoryBackend::new();
        b.put("chunks/ab/1", Bytes::from_static(b"x"))
            .await
            .unwrap();
        b.put("chunks/aa/2", Bytes::from_static(b"yy"))
            .await
            .unwrap();
        b.put("config", Bytes::from_static(b"c")).await.unwrap();
        let listed = b.list("chunks/").await.unwrap();
        assert_eq!(
            listed.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["chunks/aa/2", "chunks/ab/1"]
        );
        assert!(!b.put_if_absent("config", Bytes::new()).await.unwrap());
        b.delete("config").await.unwrap();
        b.delete("config").await.unwrap();
        assert!(matches!(
            b.get("config").await,
            Err(RepoError::NotFound { .. })
        ));
        assert!(b.put("../escape", Bytes::new()).await.is_err());
        b.fail_next(1);
        assert!(b.get("chunks/ab/1").await.unwrap_err().is_transient());
        assert_eq!(
            b.get("chunks/ab/1").await.unwrap(),
            Bytes::from_static(b"x")
        );
    }
}
