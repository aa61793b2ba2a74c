//! The `EXECD_ENVS` file: variables every command, bash session, PTY shell and isolated session
//! starts with, as execd loads them. Its path goes into their environment as `EXECD_ENVS`, so
//! what they append to it (the SDK's `commands.set_env` does, with a command) holds for every
//! later start. The file is read anew for each start, inside the sandbox's root (the main
//! container's in sidecar mode).
//!
//! One `KEY=VALUE` per line; blank lines and `#` comments are skipped, so is a line without `=`
//! or with a key that is not a variable name; `export ` before the key is allowed. A value in
//! single quotes is taken as it is (the SDK's lossless form); one in double quotes has `\\`,
//! `\"`, `\n`, `\r` and `\t` unescaped and then `$NAME` / `${NAME}` expanded; a bare value is
//! expanded (execd 1.0). Expansion sees the file's earlier lines, then the environment under it;
//! an undefined name expands to nothing. A later line wins over an earlier one.

use std::io::Read;
use std::path::Path;

use nix::fcntl::OFlag;

use crate::files::root::Root;

/// A larger file is ignored (with a warning) rather than read into every start.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// The variable that names the file, in the environment of what starts.
pub const VARIABLE: &str = "EXECD_ENVS";

/// The file, by its path in the sandbox.
#[derive(Debug, Clone)]
pub struct EnvFile {
    path: String,
}

impl EnvFile {
    /// `None` for `off`, which turns the file off; a relative path is refused.
    pub fn new(path: &str) -> Result<Option<EnvFile>, String> {
        if path == "off" {
            return Ok(None);
        }
        if !path.starts_with('/') || path.contains('\0') {
            return Err(format!(
                "the EXECD_ENVS file {path:?} is not an absolute path (or `off`)"
            ));
        }
        Ok(Some(EnvFile { path: path.into() }))
    }

    /// `EXECD_ENVS=<path>`, then the file's variables, read inside `root` and expanded over
    /// `env` (the environment they go on top of). A missing file has none.
    pub fn variables(&self, root: &Path, env: &[(String, String)]) -> Vec<(String, String)> {
        let mut vars = vec![(VARIABLE.to_string(), self.path.clone())];
        match self.read(root) {
            Ok(Some(text)) => vars.extend(parse(&text, env)),
            Ok(None) => {}
            Err(e) => tracing::warn!(file = %self.path, error = %e, "EXECD_ENVS file ignored"),
        }
        vars
    }

    fn read(&self, root: &Path) -> Result<Option<String>, String> {
        let opened = Root::open(root).and_then(|r| r.open_at(&self.path, OFlag::O_RDONLY));
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
        }
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }
}

/// The variables of the file's text (see the module docs), in file order.
fn parse(text: &str, env: &[(String, String)]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !super::sessions::is_name(key) {
            continue;
        }
        let lookup = |name: &str| {
            vars.iter()
                .rev()
                .chain(env.iter().rev())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let value = if let Some(inner) = quoted(raw, '\'') {
            inner.to_string()
        } else if let Some(inner) = quoted(raw, '"') {
            super::substitute(&unescape(inner), lookup).0
        } else {
            super::substitute(raw, lookup).0
        };
        vars.push((key.to_string(), value));
    }
    vars
}

fn quoted(raw: &str, quote: char) -> Option<&str> {
    raw.strip_prefix(quote)?.strip_suffix(quote)
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some(c @ ('\\' | '"')) => out.push(c),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![("HOME".into(), "/home/u".into())]
    }

    #[test]
    fn the_sdks_forms_and_execds_bare_values_parse() {
        let text = "\
# a comment

A='it''s $HOME literal'
B=\"say \\\"hi\\\"\\tto $HOME\\\\n\"
C=$HOME/bin:${A}x
export D=1
not a line
9BAD=x
A='last wins'
E=$UNDEFINED.$
";
        assert_eq!(
            parse(text, &env()),
            [
                ("A", "it''s $HOME literal"),
                ("B", "say \"hi\"\tto /home/u\\n"),
                ("C", "/home/u/bin:it''s $HOME literalx"),
                ("D", "1"),
                ("A", "last wins"),
                ("E", ".$"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn the_file_is_read_inside_the_root_and_its_path_is_exported() {
        let root = tempfile::tempdir().unwrap();
        let file = EnvFile::new("/opt/opensandbox/.env").unwrap().unwrap();
        let path_only = [(VARIABLE.to_string(), "/opt/opensandbox/.env".to_string())];
        assert_eq!(file.variables(root.path(), &env()), path_only);
        std::fs::create_dir_all(root.path().join("opt/opensandbox")).unwrap();
        std::fs::write(root.path().join("opt/opensandbox/.env"), "K='v'\n").unwrap();
        let vars = file.variables(root.path(), &env());
        assert_eq!(vars[1], ("K".to_string(), "v".to_string()));
        assert!(EnvFile::new("off").unwrap().is_none());
        assert!(EnvFile::new("relative/.env").is_err());
    }
}
