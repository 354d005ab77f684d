//! Groups for the socket file: a numeric gid or a name looked up in `/etc/group`.
//!
//! The lookup parses `/etc/group` itself (no NSS), so it works in static binaries.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

/// A group given by the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupSpec {
    /// A numeric gid.
    Id(u32),
    /// A group name.
    Name(String),
}

impl FromStr for GroupSpec {
    type Err = GroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(GroupError::Empty);
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .ok()
                .filter(|id| *id != u32::MAX)
                .map(GroupSpec::Id)
                .ok_or_else(|| GroupError::BadId(s.to_string()));
        }
        Ok(GroupSpec::Name(s.to_string()))
    }
}

/// A group that cannot be resolved.
#[derive(Debug, Error, displaydoc::Display)]
#[ignore_extra_doc_attributes]
pub enum GroupError {
    /// empty group
    ///
    /// Empty string.
    Empty,
    /// group id {0} is out of range
    ///
    /// Digits that do not fit a gid.
    BadId(String),
    /// cannot read {path}: {error}
    ///
    /// The group file could not be read.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// no group named {0:?} in /etc/group
    ///
    /// No such group.
    Unknown(String),
}

impl GroupSpec {
    /// The gid: the number itself, or the name looked up in `/etc/group`.
    pub fn resolve(&self) -> Result<u32, GroupError> {
        self.resolve_in(Path::new("/etc/group"))
    }

    /// As [`resolve`](Self::resolve), with another group file.
    pub fn resolve_in(&self, group_file: &Path) -> Result<u32, GroupError> {
        match self {
            GroupSpec::Id(id) => Ok(*id),
            GroupSpec::Name(name) => {
                let text = std::fs::read_to_string(group_file).map_err(|error| {
                    GroupError::Unreadable {
                        path: group_file.to_path_buf(),
                        error,
                    }
                })?;
                find_gid(&text, name).ok_or_else(|| GroupError::Unknown(name.clone()))
            }
        }
    }
}

/// Finds `name` in the text of a group file (`name:password:gid:members` lines).
pub fn find_gid(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        let group = fields.next()?;
        let _password = fields.next()?;
        let gid = fields.next()?;
        (group == name)
            .then(|| gid.trim().parse().ok())
            .flatten()
            .filter(|id| *id != u32::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str =
        "root:x:0:\n# comment\nbroken\nkvm:x:993:alice,bob\nempty::12:\nbad:x:nope:\n";

    #[test]
    fn parses_specs() {
        assert_eq!("993".parse::<GroupSpec>().unwrap(), GroupSpec::Id(993));
        assert_eq!(
            "kvm".parse::<GroupSpec>().unwrap(),
            GroupSpec::Name("kvm".into())
        );
        assert!(matches!("".parse::<GroupSpec>(), Err(GroupError::Empty)));
        assert!(matches!(
            "99999999999".parse::<GroupSpec>(),
            Err(GroupError::BadId(_))
        ));
        assert!(matches!(
            "4294967295".parse::<GroupSpec>(),
            Err(GroupError::BadId(_))
        ));
    }

    #[test]
    fn finds_groups() {
        assert_eq!(find_gid(SAMPLE, "root"), Some(0));
        assert_eq!(find_gid(SAMPLE, "kvm"), Some(993));
        assert_eq!(find_gid(SAMPLE, "empty"), Some(12));
        assert_eq!(find_gid(SAMPLE, "bad"), None);
        assert_eq!(find_gid(SAMPLE, "broken"), None);
        assert_eq!(find_gid(SAMPLE, "alice"), None);
    }

    #[test]
    fn resolves_root_from_the_real_file() {
        assert_eq!(GroupSpec::Name("root".into()).resolve().unwrap(), 0);
        assert!(matches!(
            GroupSpec::Name("no-such-group-ivshm".into()).resolve(),
            Err(GroupError::Unknown(_))
        ));
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,200}", name in "[a-z:]{0,8}") {
            let _ = find_gid(&text, &name);
        }
    }
}
