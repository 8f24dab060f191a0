//! Owner and group names, read from `/etc/passwd` and `/etc/group` (what
//! a static binary on a NAS has; directory services are not consulted),
//! so that owners travel by name where both sites know the name and by
//! number otherwise.

use std::collections::HashMap;

/// The names of users and groups, both ways.
#[derive(Debug, Default)]
pub(crate) struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    uids: HashMap<String, u32>,
    gids: HashMap<String, u32>,
}

impl Names {
    /// Reads this system's files; a missing or unreadable one names nobody.
    pub(crate) fn load() -> Names {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Names::parse(&read("/etc/passwd"), &read("/etc/group"))
    }

    fn parse(passwd: &str, group: &str) -> Names {
        let mut n = Names::default();
        for (name, id) in records(passwd) {
            n.users.entry(id).or_insert_with(|| name.to_string());
            n.uids.entry(name.to_string()).or_insert(id);
        }
        for (name, id) in records(group) {
            n.groups.entry(id).or_insert_with(|| name.to_string());
            n.gids.entry(name.to_string()).or_insert(id);
        }
        n
    }

    pub(crate) fn user(&self, uid: u32) -> Option<&str> {
        self.users.get(&uid).map(String::as_str)
    }

    pub(crate) fn group(&self, gid: u32) -> Option<&str> {
        self.groups.get(&gid).map(String::as_str)
    }

    pub(crate) fn uid_of(&self, name: &str) -> Option<u32> {
        self.uids.get(name).copied()
    }

    pub(crate) fn gid_of(&self, name: &str) -> Option<u32> {
        self.gids.get(name).copied()
    }
}

/// A user or group name bitfog passes on: 1 to 64 printable ASCII
/// characters, none of them a space, a colon or a percent sign (they
/// travel in a header). Any other is dropped, and the numeric id stands.
pub(crate) fn is_owner_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b'%')
}

/// `name:password:id:...` lines: each usable name with its id.
fn records(text: &str) -> impl Iterator<Item = (&str, u32)> {
    text.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse().ok()?;
        is_owner_name(name).then_some((name, id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_ways_and_skips_what_is_not_a_record() {
        let n = Names::parse(
            "root:x:0:0:root:/root:/bin/sh\n# comment\nbad\nalice:x:1000:1000::/home/alice:/bin/sh\nalias:x:1000:1000::/:\n",
            "root:x:0:\nusers:x:100:alice\n",
        );
        assert_eq!(n.user(1000), Some("alice"), "the first name of an id wins");
        assert_eq!(n.uid_of("alias"), Some(1000));
        assert_eq!(n.group(100), Some("users"));
        assert_eq!(n.gid_of("root"), Some(0));
        assert_eq!(n.user(5), None);
        assert_eq!(n.uid_of("# comment"), None);
    }
}
