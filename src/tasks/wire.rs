//! The task API's JSON, shaped exactly like the Go task-executor's `pkg/task-executor` types so
//! that the Go controller's client decodes sandlet's answers unchanged.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One task, flat as on the Go wire. Incoming `processStatus`, `podStatus` and
/// `deletionTimestamp` are ignored: status is sandlet's to report, never the client's to set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_time")]
    pub deletion_timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_spec: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_status: Option<ProcessStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_status: Option<serde_json::Value>,
}

/// What to run. `null` lists decode as empty, as Go's do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default, deserialize_with = "null_as_default")]
    pub command: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub args: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<EnvVar>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub working_dir: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_zero"
    )]
    pub timeout_seconds: i64,
    /// sandlet extension: `user[:group]`, names or numbers, resolved in the container's own
    /// `/etc/passwd` and `/etc/group`. Empty: the main container's user (sidecar mode) or
    /// sandlet's (local mode).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub user: String,
}

/// A Kubernetes `EnvVar`; `valueFrom` is kept only so that it can be refused with a clear error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    #[serde(default)]
    pub name: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<serde_json::Value>,
}

/// Exactly one of the three is set, mirroring Kubernetes' `ContainerState`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcessStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<Terminated>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    #[serde(default, with = "opt_time")]
    pub started_at: Option<DateTime<Utc>>,
}

/// `exitCode` is always present. sandlet fills `signal` when a signal ended the process (Go never
/// did) and uses `exitCode: -1` when no exit status exists (never started, or lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Terminated {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub signal: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, with = "opt_time")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, with = "opt_time")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Decodes a request's task list. serde's derive also reads a struct from a JSON *array* of its
/// fields; the Go decoder does not, and neither does sandlet: objects are required wherever the
/// wire format has objects.
pub fn tasks_from_json(value: serde_json::Value) -> Result<Vec<Task>, String> {
    let items = value.as_array().ok_or("expected a JSON array of tasks")?;
    for (i, item) in items.iter().enumerate() {
        objects_where_expected(item).map_err(|e| format!("task [{i}]: {e}"))?;
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Decodes one task; see [`tasks_from_json`].
pub fn task_from_json(value: serde_json::Value) -> Result<Task, String> {
    objects_where_expected(&value)?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

fn objects_where_expected(task: &serde_json::Value) -> Result<(), String> {
    let object_or_null = |v: Option<&serde_json::Value>, what: &str| match v {
        None | Some(serde_json::Value::Null | serde_json::Value::Object(_)) => Ok(()),
        Some(_) => Err(format!("{what} must be a JSON object")),
    };
    let task = task.as_object().ok_or("a task must be a JSON object")?;
    for field in ["process", "processStatus", "podTemplateSpec", "podStatus"] {
        object_or_null(task.get(field), field)?;
    }
    if let Some(env) = task
        .get("process")
        .and_then(|p| p.get("env"))
        .and_then(|e| e.as_array())
    {
        for var in env {
            object_or_null(Some(var), "each process.env entry")?;
        }
    }
    Ok(())
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Kubernetes `metav1.Time`: RFC 3339 in whole seconds, UTC, `null` for "no time".
pub mod opt_time {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => DateTime::parse_from_rfc3339(&s)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_go_controller_task_with_nulls() {
        let t: Task = serde_json::from_str(
            r#"{"name":"bsb-0","process":{"command":["sh","-c"],"args":null,"env":null,"timeoutSeconds":5},"processStatus":{"running":{"startedAt":null}}}"#,
        )
        .unwrap();
        let p = t.process.unwrap();
        assert_eq!(p.command, ["sh", "-c"]);
        assert!(p.args.is_empty() && p.env.is_empty());
        assert_eq!(p.timeout_seconds, 5);
    }

    #[test]
    fn arrays_are_not_objects() {
        let ok = serde_json::json!([{"name": "t", "process": {"command": ["true"], "env": [{"name": "A", "value": "1"}]}}]);
        assert_eq!(tasks_from_json(ok).unwrap().len(), 1);
        for bad in [
            serde_json::json!([["t", null, {"command": ["true"]}]]),
            serde_json::json!([{"name": "t", "process": [["true"]]}]),
            serde_json::json!([{"name": "t", "process": {"command": ["true"], "env": [["A", "1"]]}}]),
            serde_json::json!({"name": "t"}),
        ] {
            assert!(tasks_from_json(bad.clone()).is_err(), "{bad}");
        }
        assert!(task_from_json(serde_json::json!(["t"])).is_err());
    }

    #[test]
    fn times_are_whole_seconds_utc() {
        let r = Running {
            started_at: Some(
                DateTime::parse_from_rfc3339("2025-12-17T10:00:00.987654321+02:00")
                    .unwrap()
                    .into(),
            ),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"startedAt":"2025-12-17T08:00:00Z"}"#
        );
        let none = Running { started_at: None };
        assert_eq!(
            serde_json::to_string(&none).unwrap(),
            r#"{"startedAt":null}"#
        );
    }
}
