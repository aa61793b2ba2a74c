//! sandlet SIGKILLed at random moments, over and over: while a `setTasks` lands (its records
//! being written, its tasks being handed to shims) and while its tasks run and end. After every
//! restart a declared set is there whole or not at all, and once the tasks have ended every
//! task ran exactly once and reports the exit code it really exited with.
//!
//! `SANDLET_CRASH_ROUNDS` sets the number of rounds (default 12; the README's figures come from
//! 200), `SANDLET_CRASH_SEED` replays a run (each run prints its seed).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Sandlet, scratch, wait_until};
use serde_json::{Value, json};

const TASKS: usize = 20;

#[derive(Debug, Default)]
struct Counts {
    rounds: usize,
    /// Kills while a setTasks request was in flight (its 200 not yet received).
    kills_during_set: usize,
    kills_while_running: usize,
    sets_applied_before_the_reply: usize,
    partial_sets: usize,
    exit_codes_checked: usize,
    exit_codes_lost: usize,
    ran_twice: usize,
    never_ran: usize,
}

#[test]
fn sigkill_at_random_moments_loses_no_exit_code_no_set_and_runs_nothing_twice() {
    let rounds: usize = env_or("SANDLET_CRASH_ROUNDS", 12);
    let seed: u64 = env_or(
        "SANDLET_CRASH_SEED",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    println!("crash test: {rounds} rounds, SANDLET_CRASH_SEED={seed}");
    let mut random = XorShift(seed);
    let mut s = Sandlet::start(&["--max-active-tasks", "64", "--stop-grace-seconds", "1"]);
    let runs = scratch();
    let mut counts = Counts::default();
    let mut previous: Vec<String> = Vec::new();
    for round in 0..rounds {
        let set = declared_set(round, runs.path(), &mut random);
        let names: Vec<String> = set.keys().cloned().collect();
        let body = Value::Array(set.values().map(|(task, _)| task.clone()).collect());

        // A setTasks, and a kill somewhere from its start to shortly after its reply.
        let url = format!("{}/setTasks", s.base);
        let request = body.to_string();
        let poster = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(request.as_bytes())
                .ok()
                .map(|r| r.status().as_u16())
        });
        std::thread::sleep(Duration::from_micros(random.below(150_000)));
        if !poster.is_finished() {
            counts.kills_during_set += 1;
        }
        s.kill9();
        let replied = poster.join().unwrap() == Some(200);
        s.boot();

        // Whole or not at all: the new set, and the removal of the previous one.
        let present = present_tasks(&s);
        let new_present = names.iter().filter(|n| present.contains_key(*n)).count();
        let old_present = previous.iter().filter(|n| present.contains_key(*n)).count();
        let applied = new_present == TASKS && old_present == 0;
        let not_applied = new_present == 0 && old_present == previous.len();
        // A set whose 200 arrived must be there; one without a reply may be either way.
        let whole = applied || (not_applied && !replied);
        if !whole {
            counts.partial_sets += 1;
            eprintln!(
                "round {round}: partial set: {new_present}/{TASKS} new, {old_present}/{} old left, replied: {replied}",
                previous.len()
            );
        }
        if applied && !replied {
            counts.sets_applied_before_the_reply += 1;
        }
        // What a controller does next: declare the set again until it is accepted.
        wait_until("the set is accepted", || {
            s.set_tasks(body.clone()).status == 200
        });

        // A kill while the tasks run (some end while sandlet is down).
        std::thread::sleep(Duration::from_micros(random.below(300_000)));
        s.kill9();
        counts.kills_while_running += 1;
        s.boot();

        let deadline = Instant::now() + Duration::from_secs(60);
        let ended = loop {
            let tasks = present_tasks(&s);
            if names.iter().all(|n| {
                tasks
                    .get(n)
                    .is_some_and(|t| t["processStatus"]["terminated"].is_object())
            }) {
                break tasks;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: tasks never ended: {tasks:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for name in &names {
            let term = &ended[name]["processStatus"]["terminated"];
            let expected = set[name].1;
            let starts = std::fs::read_to_string(runs.path().join(name))
                .map(|t| t.lines().count())
                .unwrap_or(0);
            counts.exit_codes_checked += 1;
            match starts {
                0 => {
                    counts.never_ran += 1;
                    eprintln!("round {round}: {name} never ran: {term}");
                }
                1 if term["exitCode"] == expected => {}
                1 => {
                    counts.exit_codes_lost += 1;
                    eprintln!("round {round}: {name} exited {expected}, reported {term}");
                }
                _ => {
                    counts.ran_twice += 1;
                    eprintln!("round {round}: {name} ran {starts} times: {term}");
                }
            }
        }
        counts.rounds += 1;
        previous = names;
    }
    println!("crash test: {counts:?}");
    assert_eq!(counts.partial_sets, 0, "{counts:?}");
    assert_eq!(counts.exit_codes_lost, 0, "{counts:?}");
    assert_eq!(counts.ran_twice, 0, "{counts:?}");
    assert_eq!(counts.never_ran, 0, "{counts:?}");
}

/// Round `round`'s tasks by name: the task, and the exit code it ends with. Each appends a line
/// to its file under `runs` when it starts, so a task that runs twice shows.
fn declared_set(
    round: usize,
    runs: &Path,
    random: &mut XorShift,
) -> BTreeMap<String, (Value, i64)> {
    (0..TASKS)
        .map(|i| {
            let name = format!("r{round}-{i}");
            let code = ((round * TASKS + i) % 250 + 1) as i64;
            let sleep = random.below(300) as f64 / 1000.0;
            let script = format!(
                "echo started >> {}; sleep {sleep}; exit {code}",
                runs.join(&name).display()
            );
            let task = json!({"name": name, "process": {"command": ["sh", "-c", script]}});
            (name, (task, code))
        })
        .collect()
}

/// Tasks listed and not being removed, by name.
fn present_tasks(s: &Sandlet) -> BTreeMap<String, Value> {
    s.tasks()
        .into_iter()
        .filter(|t| t["deletionTimestamp"].is_null())
        .map(|t| (t["name"].as_str().unwrap().to_string(), t))
        .collect()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The fault injector's randomness: reproducible from its seed, no dependency.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
