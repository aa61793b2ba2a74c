//! Users and groups as a container knows them: its own `/etc/passwd` and `/etc/group`, read
//! inside its root (`/proc/<pid>/root` in sidecar mode, `/` in local mode) with every symlink
//! resolved inside that root, never the sidecar's files and never NSS (a static binary has none).

use std::io::Read;
use std::path::Path;

use nix::fcntl::OFlag;

use crate::files::root::Root;

use crate::process::enter::Credentials;

/// Larger account files are refused rather than read into memory.
const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A resolved user: the credentials to run with and what `HOME` and `USER` become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub credentials: Credentials,
    pub name: Option<String>,
    pub home: String,
}

#[derive(Debug, Default)]
pub struct UserDb {
    accounts: Vec<Account>,
    groups: Vec<Group>,
}

impl UserDb {
    /// Reads the account files under `root`; a missing file is an empty one (images without
    /// `/etc/passwd` exist), an unreadable one is an error.
    pub fn read(root: &Path) -> Result<UserDb, String> {
        let dir = Root::open(root).map_err(|e| format!("cannot open {}: {e}", root.display()))?;
        let passwd = read_in_root(&dir, "/etc/passwd")?;
        let group = read_in_root(&dir, "/etc/group")?;
        Ok(UserDb::parse(&passwd, &group))
    }

    fn parse(passwd: &str, group: &str) -> UserDb {
        let accounts = passwd
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.len() >= 7).then_some(())?;
                Some(Account {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.len() >= 4).then_some(())?;
                Some(Group {
                    name: f[0].to_string(),
                    gid: f[2].parse().ok()?,
                    members: f[3]
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                })
            })
            .collect();
        UserDb { accounts, groups }
    }

    pub fn by_uid(&self, uid: u32) -> Option<&Account> {
        self.accounts.iter().find(|a| a.uid == uid)
    }

    pub fn uid_of(&self, name: &str) -> Option<u32> {
        self.accounts.iter().find(|a| a.name == name).map(|a| a.uid)
    }

    pub fn gid_of(&self, name: &str) -> Option<u32> {
        self.groups.iter().find(|g| g.name == name).map(|g| g.gid)
    }

    pub fn group_name(&self, gid: u32) -> Option<&str> {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name.as_str())
    }

    /// Resolves `user[:group]`, each a name or a number. A name must exist; a uid need not (it
    /// then runs with gid 0 and `HOME=/`, as container runtimes do). Supplementary groups are the
    /// primary group plus every group that lists the user as a member.
    pub fn resolve(&self, spec: &str) -> Result<User, String> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(format!("user {spec:?} is not of the form user[:group]"));
        }
        // (uid_t)-1 means "no change" to setuid and friends, never a user or a group.
        if [Some(user), group]
            .into_iter()
            .flatten()
            .any(|id| id == u32::MAX.to_string())
        {
            return Err(format!("{spec:?}: {} is not a user or group id", u32::MAX));
        }
        let account = match user.parse::<u32>() {
            Ok(uid) => self.by_uid(uid).cloned().ok_or(uid),
            Err(_) => Ok(self
                .accounts
                .iter()
                .find(|a| a.name == user)
                .cloned()
                .ok_or_else(|| format!("user {user:?} is not in the container's /etc/passwd"))?),
        };
        let (uid, primary, name, home) = match account {
            Ok(a) => (a.uid, a.gid, Some(a.name), a.home),
            Err(uid) => (uid, 0, None, "/".to_string()),
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    self.groups
                        .iter()
                        .find(|x| x.name == g)
                        .ok_or_else(|| format!("group {g:?} is not in the container's /etc/group"))?
                        .gid
                }
            },
        };
        let mut groups = vec![gid];
        if let Some(name) = &name {
            for g in &self.groups {
                if g.members.iter().any(|m| m == name) && !groups.contains(&g.gid) {
                    groups.push(g.gid);
                }
            }
        }
        Ok(User {
            credentials: Credentials { uid, gid, groups },
            name,
            home,
        })
    }
}

fn read_in_root(root: &Root, path: &str) -> Result<String, String> {
    let fd = match root.open_at(path, OFlag::O_RDONLY) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(format!("cannot open the container's {path}: {e}")),
    };
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the container's {path}: {e}"))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "the container's {path} is larger than {MAX_FILE_BYTES} bytes"
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/home/sandbox:/bin/sh\nbroken line\n";
    const GROUP: &str = "root:x:0:\nsandbox:x:1000:\nextra:x:2000:sandbox,other\nwheel:x:10:\n";

    fn db() -> UserDb {
        UserDb::parse(PASSWD, GROUP)
    }

    #[test]
    fn names_and_numbers_resolve_with_their_groups() {
        let u = db().resolve("sandbox").unwrap();
        assert_eq!(u.credentials.uid, 1000);
        assert_eq!(u.credentials.gid, 1000);
        assert_eq!(u.credentials.groups, [1000, 2000]);
        assert_eq!(u.name.as_deref(), Some("sandbox"));
        assert_eq!(u.home, "/home/sandbox");
        assert_eq!(db().resolve("1000").unwrap(), u);
        let with_group = db().resolve("sandbox:wheel").unwrap();
        assert_eq!(with_group.credentials.gid, 10);
        assert_eq!(with_group.credentials.groups, [10, 2000]);
        assert_eq!(db().resolve("sandbox:77").unwrap().credentials.gid, 77);
    }

    #[test]
    fn an_unknown_uid_runs_as_runtimes_do_and_unknown_names_are_refused() {
        let u = db().resolve("4242").unwrap();
        assert_eq!(
            (u.credentials.uid, u.credentials.gid, u.home.as_str()),
            (4242, 0, "/")
        );
        assert_eq!(u.name, None);
        assert!(db().resolve("nobody").unwrap_err().contains("/etc/passwd"));
        assert!(
            db().resolve("sandbox:nogroup")
                .unwrap_err()
                .contains("/etc/group")
        );
        assert!(db().resolve("sandbox:").is_err());
        assert!(db().resolve(":1").is_err());
    }

    #[test]
    fn files_are_read_inside_the_root_even_through_absolute_symlinks() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("real")).unwrap();
        std::fs::write(
            root.path().join("real/passwd"),
            "inside:x:7:7::/in:/bin/sh\n",
        )
        .unwrap();
        // Absolute: outside the root it would be the host's /real/passwd.
        std::os::unix::fs::symlink("/real/passwd", root.path().join("etc/passwd")).unwrap();
        std::fs::write(root.path().join("real/group"), "ingroup:x:9:inside\n").unwrap();
        // Relative, climbing past the root: clamped at the root, so it stays inside.
        std::os::unix::fs::symlink("../../../../../real/group", root.path().join("etc/group"))
            .unwrap();
        let db = UserDb::read(root.path()).unwrap();
        assert_eq!(db.by_uid(7).unwrap().name, "inside");
        assert_eq!(db.resolve("inside").unwrap().credentials.groups, [7, 9]);
    }
}
