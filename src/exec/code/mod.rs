//! Code interpreting (`/code*`): contexts, each one kernel of a Jupyter server, and runs of code
//! in them streamed as execd's events (`../shared/reference/opensandbox-1.1-clients.md` §B).
//!
//! A context's id is sandlet's own (32 hex digits, execd's shape), so it stays the same when its
//! kernel has to be started again. Its kernel is started when the context is created
//! explicitly, or by its first run (a language's default context). Runs of one context go one
//! at a time, in order; different contexts run at once. Unlike execd: rich results and
//! displayed values (`display_data`: plots) arrive with their MIME bundles, a run has a
//! deadline, contexts are limited in number and removed when idle, the kernel's messages are
//! matched to the run that asked for them, and a kernel's death, a Jupyter restart or a Jupyter
//! that is not there are told as error events.

mod channel;
mod execution;
pub mod jupyter;
mod server;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use indexmap::IndexMap;
use tokio::sync::mpsc;

use self::channel::KernelChannel;
use self::execution::{Ended, Run, Sink};
use self::jupyter::{Jupyter, JupyterError, choose_spec};
pub use self::server::{Backend, Managed, ManagedConfig};
use super::events::Event;
use super::run::INTERRUPT_GRACE;
use crate::container::TargetWatch;

/// The languages execd sends to Jupyter; others are accepted when a kernel for them is
/// installed.
const EXECD_LANGUAGES: [&str; 6] = ["python", "java", "javascript", "typescript", "go", "bash"];
/// Frames buffered between a run and its client.
const STREAM_BUFFER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("{0}")]
    UnknownLanguage(String),
    #[error("{0}")]
    NoKernel(String),
    #[error("context {0} not found")]
    ContextNotFound(String),
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    NotInstalled(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Jupyter(#[from] JupyterError),
}

impl CodeError {
    /// The `ename` of the error event that tells it.
    fn ename(&self) -> &'static str {
        match self {
            CodeError::UnknownLanguage(_) | CodeError::NoKernel(_) => "NoKernel",
            CodeError::ContextNotFound(_) => "ContextNotFound",
            CodeError::Limit(_) => "LimitExceeded",
            CodeError::NotInstalled(_) => "JupyterNotInstalled",
            CodeError::Unavailable(_) | CodeError::Jupyter(JupyterError::Unreachable(..)) => {
                "JupyterUnavailable"
            }
            CodeError::Jupyter(_) => "JupyterError",
        }
    }
}

/// Limits of code interpreting (documented defaults in docs/code-interpreting.md).
#[derive(Debug, Clone)]
pub struct CodeConfig {
    pub max_contexts: usize,
    /// A context unused this long is removed, its kernel shut down.
    pub context_idle: Duration,
    /// A run's deadline when the request gives none; `None`: no deadline.
    pub run_timeout: Option<Duration>,
}

pub struct Code {
    config: CodeConfig,
    backend: Backend,
    target: Option<Arc<TargetWatch>>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    contexts: IndexMap<String, Arc<Context>>,
    /// Each language's default context (runs that name no context).
    defaults: HashMap<String, String>,
}

pub struct Context {
    pub id: String,
    pub language: String,
    pub cwd: Option<String>,
    /// Held for the length of a run (and of a kernel start): runs go one at a time.
    kernel: tokio::sync::Mutex<Option<Kernel>>,
    /// The kernel, for interrupts while a run holds `kernel`.
    interrupt_to: Mutex<Option<(Jupyter, String)>>,
    last_used: Mutex<Instant>,
    deleted: AtomicBool,
    /// Ends a run that a deletion's interrupt did not end.
    stop: tokio::sync::Notify,
}

struct Kernel {
    jupyter: Jupyter,
    session_id: String,
    kernel_id: String,
    /// The server incarnation it lives in (a managed server's restart loses it).
    incarnation: u64,
    channel: Option<KernelChannel>,
}

/// What `POST /code` asked for.
pub struct RunRequest {
    pub code: String,
    pub context_id: Option<String>,
    pub language: String,
    pub timeout: Option<Duration>,
}

impl Code {
    pub fn new(
        config: CodeConfig,
        backend: Backend,
        target: Option<Arc<TargetWatch>>,
    ) -> Arc<Code> {
        Arc::new(Code {
            config,
            backend,
            target,
            table: Mutex::new(Table::default()),
        })
    }

    /// A language is one execd knows, or one a kernel installed here runs.
    pub async fn check_language(&self, language: &str) -> Result<(), CodeError> {
        if EXECD_LANGUAGES.contains(&language) {
            return Ok(());
        }
        let installed = match self.backend.endpoint().await {
            Ok((jupyter, _)) => jupyter.kernel_specs().await.ok(),
            Err(_) => None,
        };
        match installed {
            Some((_, specs))
                if specs
                    .iter()
                    .any(|s| s.language.eq_ignore_ascii_case(language)) =>
            {
                Ok(())
            }
            Some((_, specs)) => Err(CodeError::UnknownLanguage(format!(
                "unknown language: {language} (languages here: {})",
                languages(&specs)
            ))),
            None => Err(CodeError::UnknownLanguage(format!(
                "unknown language: {language}"
            ))),
        }
    }

    /// `POST /code/context`: a context with its kernel started.
    pub async fn create_context(
        self: &Arc<Self>,
        language: &str,
        cwd: Option<String>,
    ) -> Result<Arc<Context>, CodeError> {
        self.check_language(language).await?;
        self.evict_idle();
        let context = self.add(language, cwd, false)?;
        let mut kernel = context.kernel.lock().await;
        if let Err(e) = self.ensure_kernel(&context, &mut kernel).await {
            drop(kernel);
            self.remove(&context.id);
            return Err(e);
        }
        drop(kernel);
        context.touch();
        Ok(context)
    }

    /// `POST /code`: the event stream of one run.
    pub async fn run(
        self: &Arc<Self>,
        request: RunRequest,
    ) -> Result<mpsc::Receiver<Bytes>, CodeError> {
        let received = Instant::now();
        let context = match &request.context_id {
            Some(id) => self
                .get(id)
                .ok_or_else(|| CodeError::ContextNotFound(id.clone()))?,
            None => {
                self.check_language(&request.language).await?;
                self.evict_idle();
                self.default_context(&request.language)?
            }
        };
        context.touch();
        let timeout = request.timeout.or(self.config.run_timeout);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut sink = Sink::new(tx);
        sink.send(Event::init(&context.id)).await;
        sink.send(Event::ping()).await;
        let code = Arc::clone(self);
        tokio::spawn(async move {
            let mut kernel = sink.pinging(context.kernel.lock()).await;
            if context.deleted.load(Ordering::Acquire) {
                sink.send(Event::error_with(
                    "ContextNotFound",
                    format!("context {} was deleted", context.id),
                    Vec::new(),
                ))
                .await;
                return;
            }
            if let Err(e) = sink
                .pinging(code.ensure_kernel(&context, &mut kernel))
                .await
            {
                sink.send(error_event(&e)).await;
                return;
            }
            let k = kernel.as_mut().expect("ensured");
            if k.channel.is_none() {
                let connecting = KernelChannel::connect(&k.jupyter, &k.kernel_id, &context.id);
                match sink.pinging(connecting).await {
                    Ok(channel) => k.channel = Some(channel),
                    Err(e) => {
                        sink.send(Event::error_with(
                            "KernelConnectionLost",
                            e.to_string(),
                            Vec::new(),
                        ))
                        .await;
                        code.forget_kernel_if_gone(&context, &mut kernel).await;
                        return;
                    }
                }
            }
            let k = kernel.as_mut().expect("ensured");
            let ended = Run {
                jupyter: &k.jupyter,
                kernel_id: &k.kernel_id,
                channel: k.channel.as_mut().expect("connected"),
                code: &request.code,
                received,
                timeout,
                stop: &context.stop,
            }
            .run(&mut sink)
            .await;
            // The stream ends here; what is left to do with the kernel is not the client's wait.
            drop(sink);
            match ended {
                Ended::Idle => {}
                Ended::KernelLost => code.drop_kernel(&context, &mut kernel).await,
                Ended::ChannelLost => code.forget_kernel_if_gone(&context, &mut kernel).await,
            }
            context.touch();
        });
        Ok(rx)
    }

    /// Makes sure the context has a live kernel: one of the server running now. A kernel of an
    /// earlier server incarnation is gone with it: that is an error (its state is lost), and
    /// the next run starts a fresh kernel.
    async fn ensure_kernel(
        &self,
        context: &Context,
        kernel: &mut Option<Kernel>,
    ) -> Result<(), CodeError> {
        if let Some(k) = kernel.as_ref() {
            if self.backend.incarnation() == Some(k.incarnation) {
                return Ok(());
            }
            *kernel = None;
            context.set_interrupt_to(None);
            return Err(CodeError::Unavailable(format!(
                "the Jupyter server of context {} stopped, and its kernel with it: the context's state is lost; the next run starts a new kernel",
                context.id
            )));
        }
        let (jupyter, incarnation) = self.backend.endpoint().await?;
        let (default, specs) = jupyter.kernel_specs().await?;
        let spec = choose_spec(default.as_deref(), &specs, &context.language).ok_or_else(|| {
            CodeError::NoKernel(format!(
                "no Jupyter kernel for {} is installed (languages here: {})",
                context.language,
                languages(&specs)
            ))
        })?;
        let directory = match &context.cwd {
            Some(cwd) => Some(cwd.clone()),
            // A managed server's root is `/`: the kernel starts where a command would.
            None if matches!(self.backend, Backend::Managed(_)) => {
                let located = self.target.as_deref().and_then(|t| t.current().ok());
                Some(crate::container::working_dir(located.as_deref()))
            }
            None => None,
        };
        let path = match directory {
            Some(dir) => format!("{}/{}.ipynb", dir.trim_end_matches('/'), context.id),
            None => format!("{}.ipynb", context.id),
        };
        let session = jupyter
            .create_session(&context.id, &path, &spec.name)
            .await?;
        tracing::info!(context = %context.id, language = %context.language, kernel = %session.kernel_id, spec = %spec.name, "kernel started");
        let channel = KernelChannel::connect(&jupyter, &session.kernel_id, &context.id)
            .await
            .ok();
        context.set_interrupt_to(Some((jupyter.clone(), session.kernel_id.clone())));
        *kernel = Some(Kernel {
            jupyter,
            session_id: session.session_id,
            kernel_id: session.kernel_id,
            incarnation,
            channel,
        });
        Ok(())
    }

    /// After a broken connection: the kernel is kept if it still exists (the next run
    /// reconnects), forgotten if not.
    async fn forget_kernel_if_gone(&self, context: &Context, kernel: &mut Option<Kernel>) {
        let Some(k) = kernel.as_mut() else { return };
        k.channel = None;
        if !matches!(k.jupyter.kernel_exists(&k.kernel_id).await, Ok(true)) {
            *kernel = None;
            context.set_interrupt_to(None);
        }
    }

    /// Shuts a kernel down (best effort: it may be gone already) and forgets it.
    async fn drop_kernel(&self, context: &Context, kernel: &mut Option<Kernel>) {
        context.set_interrupt_to(None);
        if let Some(k) = kernel.take()
            && let Err(e) = k.jupyter.delete_session(&k.session_id).await
        {
            tracing::debug!(context = %context.id, error = %e, "the session of a lost kernel could not be deleted");
        }
    }

    /// `DELETE /code?id=`: interrupts the context's kernel. `None` when no context has the id.
    pub async fn interrupt(&self, id: &str) -> Option<Result<(), CodeError>> {
        let context = self.get(id)?;
        let target = context.lock_interrupt_to().clone();
        Some(match target {
            Some((jupyter, kernel_id)) => {
                tracing::info!(context = id, "interrupting the kernel");
                jupyter.interrupt(&kernel_id).await.map_err(CodeError::from)
            }
            // No kernel: nothing runs.
            None => Ok(()),
        })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.lock().contexts.get(id).cloned()
    }

    /// Every context (explicit and default), or those of one language, oldest first.
    pub fn list(self: &Arc<Self>, language: Option<&str>) -> Vec<Arc<Context>> {
        self.evict_idle();
        self.lock()
            .contexts
            .values()
            .filter(|c| language.is_none_or(|l| c.language == l))
            .cloned()
            .collect()
    }

    /// `DELETE /code/contexts/{id}`: forgets the context and shuts its kernel down.
    pub async fn delete(&self, id: &str) -> Result<(), CodeError> {
        let context = self
            .remove(id)
            .ok_or_else(|| CodeError::ContextNotFound(id.to_string()))?;
        self.shut_down(context).await
    }

    /// `DELETE /code/contexts?language=`: every context of the language.
    pub async fn delete_language(self: &Arc<Self>, language: &str) -> Result<(), CodeError> {
        let ids: Vec<String> = self
            .list(Some(language))
            .iter()
            .map(|c| c.id.clone())
            .collect();
        let mut first_error = None;
        for id in ids {
            if let Some(context) = self.remove(&id)
                && let Err(e) = self.shut_down(context).await
            {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes contexts unused for longer than the idle limit (never one that is running).
    pub fn evict_idle(self: &Arc<Self>) {
        let idle = self.config.context_idle;
        let expired: Vec<String> = self
            .lock()
            .contexts
            .values()
            .filter(|c| c.idle_for() > idle && c.kernel.try_lock().is_ok())
            .map(|c| c.id.clone())
            .collect();
        for id in expired {
            tracing::info!(context = %id, "code context idle too long; removed");
            if let Some(context) = self.remove(&id) {
                let code = Arc::clone(self);
                tokio::spawn(async move {
                    let _ = code.shut_down(context).await;
                });
            }
        }
    }

    /// Stops a removed context: a run in progress is interrupted (its kernel shut down if
    /// that does not end it within the grace), then the kernel is shut down once the run has
    /// let go of it.
    async fn shut_down(&self, context: Arc<Context>) -> Result<(), CodeError> {
        context.deleted.store(true, Ordering::Release);
        let running = context.lock_interrupt_to().clone();
        let mut kernel = match (running, context.kernel.try_lock()) {
            (_, Ok(kernel)) => kernel,
            (None, Err(_)) => context.kernel.lock().await,
            (Some((jupyter, kernel_id)), Err(_)) => {
                let _ = jupyter.interrupt(&kernel_id).await;
                match tokio::time::timeout(INTERRUPT_GRACE, context.kernel.lock()).await {
                    Ok(kernel) => kernel,
                    Err(_) => {
                        // The run ends (and shuts its kernel down) when told to.
                        context.stop.notify_one();
                        context.kernel.lock().await
                    }
                }
            }
        };
        context.set_interrupt_to(None);
        if let Some(k) = kernel.take() {
            match k.jupyter.delete_session(&k.session_id).await {
                Ok(()) => {}
                // Gone already (a restarted server): nothing left to shut down.
                Err(e) if e.is_not_found() => {}
                Err(JupyterError::Unreachable(..))
                    if self.backend.incarnation() != Some(k.incarnation) => {}
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(context = %context.id, "code context deleted");
        Ok(())
    }

    fn default_context(&self, language: &str) -> Result<Arc<Context>, CodeError> {
        {
            let table = self.lock();
            if let Some(context) = table
                .defaults
                .get(language)
                .and_then(|id| table.contexts.get(id))
            {
                return Ok(Arc::clone(context));
            }
        }
        self.add(language, None, true)
    }

    /// A new context without a kernel yet, within the limit.
    fn add(
        &self,
        language: &str,
        cwd: Option<String>,
        default: bool,
    ) -> Result<Arc<Context>, CodeError> {
        let mut table = self.lock();
        if default
            && let Some(id) = table.defaults.get(language)
            && let Some(c) = table.contexts.get(id)
        {
            return Ok(Arc::clone(c));
        }
        if table.contexts.len() >= self.config.max_contexts {
            return Err(CodeError::Limit(format!(
                "{} code contexts exist; the limit is {} (--code-max-contexts); delete one first",
                table.contexts.len(),
                self.config.max_contexts
            )));
        }
        let context = Arc::new(Context {
            id: crate::exec::new_id(),
            language: language.to_string(),
            cwd,
            kernel: tokio::sync::Mutex::new(None),
            interrupt_to: Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
            deleted: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
        });
        table
            .contexts
            .insert(context.id.clone(), Arc::clone(&context));
        if default {
            table
                .defaults
                .insert(language.to_string(), context.id.clone());
        }
        Ok(context)
    }

    fn remove(&self, id: &str) -> Option<Arc<Context>> {
        let mut table = self.lock();
        let context = table.contexts.shift_remove(id)?;
        table.defaults.retain(|_, default| default != id);
        Some(context)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Context {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn lock_interrupt_to(&self) -> MutexGuard<'_, Option<(Jupyter, String)>> {
        self.interrupt_to.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_interrupt_to(&self, to: Option<(Jupyter, String)>) {
        *self.lock_interrupt_to() = to;
    }
}

fn languages(specs: &[jupyter::KernelSpec]) -> String {
    let mut names: Vec<&str> = specs.iter().map(|s| s.language.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn error_event(e: &CodeError) -> Event {
    Event::error_with(e.ename(), e.to_string(), Vec::new())
}
