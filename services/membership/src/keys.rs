//! The key layout of one cluster in etcd. Everything lives under `/eagle/<cluster>/`:
//!
//! - `members/<kind>/<group>/<rank>`: a member's [`crate::MemberRecord`], on its lease.
//! - `placement/<session_id>`: where a session's KV cache lives ([`crate::Placement`]), on a
//!   lease as long as the worker's session idle timeout.
//! - `rendezvous/<group>/<rank>`: a tensor-parallel rank's address while its group starts.

use crate::record::Kind;

#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Keys {
            root: format!("/eagle/{cluster}/"),
        }
    }

    /// Every key of the cluster.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn members(&self) -> String {
        format!("{}members/", self.root)
    }

    pub fn member(&self, kind: Kind, group: &str, rank: u32) -> String {
        format!("{}members/{}/{group}/{rank}", self.root, kind.as_str())
    }

    pub fn placements(&self) -> String {
        format!("{}placement/", self.root)
    }

    pub fn placement(&self, session_id: &str) -> String {
        format!("{}placement/{session_id}", self.root)
    }

    /// The lock a coordinator holds while a session's turn runs.
    pub fn session_lock(&self, session_id: &str) -> String {
        format!("{}lock/session/{session_id}", self.root)
    }

    pub fn rendezvous(&self, group: &str) -> String {
        format!("{}rendezvous/{group}/", self.root)
    }

    /// What a key under the root is: a member, a placement, or something else.
    pub fn classify<'a>(&self, key: &'a str) -> Option<KeyKind<'a>> {
        let rest = key.strip_prefix(self.root.as_str())?;
        if rest.starts_with("members/") {
            Some(KeyKind::Member)
        } else {
            rest.strip_prefix("placement/").map(KeyKind::Placement)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    Member,
    /// The session id.
    Placement(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("c1");
        assert_eq!(
            k.member(Kind::Worker, "g0", 1),
            "/eagle/c1/members/worker/g0/1"
        );
        assert_eq!(
            k.classify(&k.member(Kind::Draft, "d", 0)),
            Some(KeyKind::Member)
        );
        assert_eq!(
            k.classify(&k.placement("s-1")),
            Some(KeyKind::Placement("s-1"))
        );
        assert_eq!(k.classify("/eagle/c2/members/worker/g/0"), None);
    }
}
