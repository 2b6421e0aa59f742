//! API keys on the public API: `authorization: Bearer KEY` (gRPC metadata or HTTP header),
//! checked against a set of keys, with an optional limit on each key's requests at once.
//!
//! Invariants:
//! - Keys are held only as SHA-256 digests and never logged; a key's identity in messages is
//!   the first 8 hex digits of its digest.
//! - Every request of the public API passes [`ApiKeys::admit`] in
//!   [`crate::Coordinator::start`] (both front ends go through it) before validation; the HTTP
//!   API also checks the key before it parses the body. A request without a good key learns
//!   nothing else about the server. Health, reflection and the chat page itself stay open.
//! - A key's running count goes down when its [`KeyPermit`] drops, which is when the request's
//!   step loop ends however it ends.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tonic::Status;

type KeyHash = [u8; 32];

pub struct ApiKeys {
    keys: HashSet<KeyHash>,
    /// Requests one key may have running or queued at once; 0: no limit.
    per_key: usize,
    running: Arc<Mutex<HashMap<KeyHash, usize>>>,
}

/// One admitted request's share of its key's limit.
pub struct KeyPermit {
    key: KeyHash,
    running: Arc<Mutex<HashMap<KeyHash, usize>>>,
}

impl Drop for KeyPermit {
    fn drop(&mut self) {
        let mut m = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn digest(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

fn short(h: &KeyHash) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of an `authorization` value: `Bearer KEY` (the scheme in any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(key.trim())
        .filter(|k| !k.is_empty())
}

impl ApiKeys {
    /// Keys from `text`: one per line or separated by commas; blank lines and `#` comments
    /// are skipped.
    pub fn parse(text: &str, per_key: usize) -> Self {
        let keys = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(digest)
            .collect();
        ApiKeys {
            keys,
            per_key,
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The keys of `file` and of `env` together (`EAGLE_API_KEYS`); None when neither is given.
    /// A file or variable that holds no key is an error: it would lock everyone out.
    pub fn load(
        file: Option<&Path>,
        env: Option<&str>,
        per_key: usize,
    ) -> anyhow::Result<Option<Self>> {
        if file.is_none() && env.is_none() {
            return Ok(None);
        }
        let mut text = String::new();
        if let Some(f) = file {
            text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("reading the API keys file {}: {e}", f.display()))?;
            text.push('\n');
        }
        if let Some(e) = env {
            text.push_str(e);
        }
        let keys = Self::parse(&text, per_key);
        if keys.keys.is_empty() {
            anyhow::bail!("the API keys file or EAGLE_API_KEYS holds no key");
        }
        Ok(Some(keys))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The digest of the known key in an `authorization` value.
    fn known(&self, authorization: Option<&str>) -> Result<KeyHash, Status> {
        let Some(value) = authorization else {
            return Err(Status::unauthenticated(
                "no API key: send `authorization: Bearer KEY`",
            ));
        };
        let Some(key) = bearer(value) else {
            return Err(Status::unauthenticated(
                "the authorization value is not `Bearer KEY`",
            ));
        };
        let h = digest(key);
        if !self.keys.contains(&h) {
            return Err(Status::unauthenticated("the API key is not valid"));
        }
        Ok(h)
    }

    /// Checks the `authorization` value; a good key counts one more request running.
    pub fn admit(&self, authorization: Option<&str>) -> Result<KeyPermit, Status> {
        let h = self.known(authorization)?;
        let mut m = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(h).or_insert(0);
        if self.per_key > 0 && *n >= self.per_key {
            return Err(Status::resource_exhausted(format!(
                "API key {} already has {} requests running, its limit",
                short(&h),
                *n
            )));
        }
        *n += 1;
        Ok(KeyPermit {
            key: h,
            running: self.running.clone(),
        })
    }

    /// Checks the key without counting a request (for listings such as `/v1/models`).
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Status> {
        self.known(authorization).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn keys_limits_and_release() {
        let k = ApiKeys::parse("# team keys\nalpha\n\n beta , gamma # spare\n", 1);
        assert_eq!(k.len(), 3);
        assert_eq!(k.admit(None).err().unwrap().code(), Code::Unauthenticated);
        assert_eq!(
            k.admit(Some("Bearer nope")).err().unwrap().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            k.admit(Some("Basic alpha")).err().unwrap().code(),
            Code::Unauthenticated
        );
        let a = k.admit(Some("bearer  alpha ")).expect("a good key");
        let e = k.admit(Some("Bearer alpha")).err().unwrap();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(!e.message().contains("alpha"), "keys are never echoed");
        let _g = k
            .admit(Some("Bearer gamma"))
            .expect("another key has its own limit");
        drop(a);
        k.admit(Some("Bearer alpha")).expect("released");
        assert!(k.check(Some("Bearer beta")).is_ok());
        assert!(k.check(Some("Bearer delta")).is_err());
    }

    #[test]
    fn an_empty_key_set_is_refused() {
        assert!(ApiKeys::load(None, Some(" , \n# none"), 0).is_err());
        assert!(ApiKeys::load(None, None, 0).unwrap().is_none());
    }
}
