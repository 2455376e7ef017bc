//! The one rule for a user id, used wherever one arrives: the gateway (the owner in `/u/<id>/`),
//! the admin API and the database layer. User ids are the auth service's UUIDs in their
//! canonical text form (lowercase hex, hyphenated, 36 characters), so one user has exactly one
//! spelling and a path can never name a user in a way the database would read differently.

// Bytes from the network: no arithmetic that can overflow, no indexing that can panic.
#![deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::fmt;
use std::sync::Arc;

/// A validated user id. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user id {0:?} is not a UUID in canonical form (lowercase, hyphenated)")]
pub struct InvalidUserId(pub String);

impl UserId {
    pub fn parse(s: &str) -> Result<UserId, InvalidUserId> {
        if Self::is_valid(s) {
            Ok(UserId(Arc::from(s)))
        } else {
            Err(InvalidUserId(s.to_owned()))
        }
    }

    /// 8-4-4-4-12 lowercase hex digits.
    pub fn is_valid(s: &str) -> bool {
        s.len() == 36
            && s.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for UserId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_uuids() {
        let id = "3f2b9c1e-aaaa-4bbb-8ccc-0123456789ab";
        assert_eq!(UserId::parse(id).map(|u| u.to_string()).ok().as_deref(), Some(id));
        for bad in [
            "",
            "alice",
            "../x",
            "3F2B9C1E-AAAA-4BBB-8CCC-0123456789AB",
            "3f2b9c1eaaaa4bbb8ccc0123456789ab",
            "{3f2b9c1e-aaaa-4bbb-8ccc-0123456789ab}",
            "3f2b9c1e-aaaa-4bbb-8ccc-0123456789ab/",
            "3f2b9c1e-aaaa-4bbb-8ccc-0123456789a%",
            "3f2b9c1e_aaaa-4bbb-8ccc-0123456789ab",
            "3f2b9c1e-aaaa-4bbb-8ccc-0123456789ag",
            "3f2b9c1e-aaaa-4bbb-8ccc-0123456789abc",
            "é2b9c1e-aaaa-4bbb-8ccc-0123456789ab",
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
