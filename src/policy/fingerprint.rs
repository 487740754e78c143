//! Short, stable, non-reversible names for secrets, so logs and tables can refer to a key or a
//! token without carrying it.

use std::fmt;

use sha2::{Digest, Sha256};

/// The first 48 bits of SHA-256, in hex: enough to tell keys apart in a table, far too little to
/// reconstruct or guess anything.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 6]);

impl Fingerprint {
    pub fn of(secret: &str) -> Self {
        let digest = Sha256::digest(secret.as_bytes());
        let mut short = [0u8; 6];
        short.copy_from_slice(&digest[..6]);
        Fingerprint(short)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_stable_short_and_distinct() {
        let a = Fingerprint::of("key-a").to_string();
        assert_eq!(a, Fingerprint::of("key-a").to_string());
        assert_eq!(a.len(), 12);
        assert_ne!(a, Fingerprint::of("key-b").to_string());
    }
}
