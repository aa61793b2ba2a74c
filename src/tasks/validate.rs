//! What makes a task acceptable. Everything here runs before any state changes, so a bad
//! request is refused whole.

use super::wire::{Process, Task};

/// Task names become directory names under the data dir, so they are restricted to one safe path
/// component (a Kubernetes object name plus `-<index>` fits).
pub const MAX_NAME_LEN: usize = 253;

pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("task name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "task name is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "task name {name:?} is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks a task as a client sent it and returns the process to run.
pub fn check_task(task: &Task) -> Result<Process, String> {
    check_name(&task.name)?;
    let name = &task.name;
    if task.pod_template_spec.is_some() && task.process.is_none() {
        return Err(format!(
            "task {name:?}: podTemplateSpec (container) tasks are not supported; give a process"
        ));
    }
    let Some(process) = &task.process else {
        return Err(format!("task {name:?} has no process"));
    };
    match process.command.first() {
        None => return Err(format!("task {name:?}: process.command is empty")),
        Some(c) if c.is_empty() => {
            return Err(format!("task {name:?}: process.command[0] is empty"));
        }
        Some(_) => {}
    }
    if process
        .command
        .iter()
        .chain(&process.args)
        .any(|a| a.contains('\0'))
    {
        return Err(format!(
            "task {name:?}: command and args must not contain NUL bytes"
        ));
    }
    for var in &process.env {
        if var.name.is_empty() || var.name.contains(['=', '\0']) {
            return Err(format!(
                "task {name:?}: env name {:?} is not valid",
                var.name
            ));
        }
        if var.value.contains('\0') {
            return Err(format!(
                "task {name:?}: env {} has a NUL byte in its value",
                var.name
            ));
        }
        if var.value_from.is_some() {
            return Err(format!(
                "task {name:?}: env {} uses valueFrom, which only the kubelet can resolve; pass a value",
                var.name
            ));
        }
    }
    if process.working_dir.contains('\0') {
        return Err(format!(
            "task {name:?}: workingDir {:?} contains NUL",
            process.working_dir
        ));
    }
    if !process.working_dir.is_empty() && !process.working_dir.starts_with('/') {
        return Err(format!(
            "task {name:?}: workingDir {:?} must be an absolute path",
            process.working_dir
        ));
    }
    if process.timeout_seconds < 0 {
        return Err(format!(
            "task {name:?}: timeoutSeconds must not be negative"
        ));
    }
    if !process.user.is_empty() {
        let (user, group) = process.user.split_once(':').unwrap_or((&process.user, "x"));
        let part_ok = |p: &str| !p.is_empty() && !p.contains([':', '\0', '\n']);
        if !part_ok(user) || !part_ok(group) {
            return Err(format!(
                "task {name:?}: user {:?} is not of the form user[:group]",
                process.user
            ));
        }
    }
    Ok(process.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["bsb-0", "a", "A.b_c-9", &"x".repeat(MAX_NAME_LEN)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc",
            ".hidden",
            "-a",
            "a b",
            "é",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    fn task(json: &str) -> Task {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn processes() {
        assert!(check_task(&task(r#"{"name":"t","process":{"command":["true"]}}"#)).is_ok());
        for bad in [
            r#"{"name":"t"}"#,
            r#"{"name":"t","process":{"command":[]}}"#,
            r#"{"name":"t","process":{"command":null}}"#,
            r#"{"name":"t","process":{"command":[""]}}"#,
            r#"{"name":"t","process":{"command":["a\u0000b"]}}"#,
            r#"{"name":"t","process":{"command":["x"],"env":[{"name":"A=B","value":"1"}]}}"#,
            r#"{"name":"t","process":{"command":["x"],"env":[{"name":"A","valueFrom":{}}]}}"#,
            r#"{"name":"t","process":{"command":["x"],"workingDir":"rel"}}"#,
            r#"{"name":"t","process":{"command":["x"],"workingDir":"/a\u0000b"}}"#,
            r#"{"name":"t","process":{"command":["x"],"timeoutSeconds":-1}}"#,
            r#"{"name":"t","podTemplateSpec":{}}"#,
            r#"{"name":"t","process":{"command":["x"],"user":"a:"}}"#,
            r#"{"name":"t","process":{"command":["x"],"user":":1"}}"#,
            r#"{"name":"t","process":{"command":["x"],"user":"a:b:c"}}"#,
        ] {
            assert!(check_task(&task(bad)).is_err(), "{bad}");
        }
    }
}
