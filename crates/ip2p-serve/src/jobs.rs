//! The edits the server knows: a bounded queue, the one running edit, finished results until
//! they expire, and each edit's event channel.
//!
//! One mutex guards it all. Events are sent while it is held, so a client that subscribes
//! (under the same lock) gets a snapshot of the state and then every later event, none twice
//! and none missed. The worker thread waits on a condvar; HTTP handlers never block on it for
//! longer than a map update.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use image::RgbImage;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::params::{EditParams, Random};

/// Where an edit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Done,
    Error,
    Cancelled,
}

impl State {
    pub fn finished(self) -> bool {
        matches!(self, State::Done | State::Error | State::Cancelled)
    }
}

/// What `done` reports: the values the edit actually used, to reproduce it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DoneInfo {
    pub seed: u64,
    pub guidance: f64,
    pub image_guidance: f64,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub scheduler: String,
}

/// A server-sent event of one edit.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `position`: edits ahead of this one, the running one included.
    Queued {
        position: usize,
    },
    Started {
        steps: usize,
    },
    /// After step `i` of `n` (1-based); `preview` a PNG data URL of the latents.
    Step {
        i: usize,
        n: usize,
        preview: Arc<str>,
    },
    Done(DoneInfo),
    Error {
        message: String,
    },
    Cancelled,
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Queued { .. } => "queued",
            Event::Started { .. } => "started",
            Event::Step { .. } => "step",
            Event::Done(_) => "done",
            Event::Error { .. } => "error",
            Event::Cancelled => "cancelled",
        }
    }

    pub fn data(&self) -> Value {
        match self {
            Event::Queued { position } => json!({ "position": position }),
            Event::Started { steps } => json!({ "steps": steps }),
            Event::Step { i, n, preview } => json!({ "i": i, "n": n, "preview": &**preview }),
            Event::Done(info) => serde_json::to_value(info).unwrap_or(Value::Null),
            Event::Error { message } => json!({ "message": message }),
            Event::Cancelled => json!({}),
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::Done(_) | Event::Error { .. } | Event::Cancelled
        )
    }
}

/// An edit the worker takes: its id, settings, input and cancel flag.
pub struct Work {
    pub id: String,
    pub params: EditParams,
    pub image: RgbImage,
    pub cancel: Arc<AtomicBool>,
}

/// How an edit ended.
pub enum Outcome {
    Done { png: Vec<u8>, info: DoneInfo },
    Error(String),
    Cancelled,
}

struct Job {
    params: EditParams,
    width: u32,
    height: u32,
    /// Taken by the worker when it starts.
    image: Option<RgbImage>,
    state: State,
    step: usize,
    preview: Option<Arc<str>>,
    result: Option<Arc<Vec<u8>>>,
    done: Option<DoneInfo>,
    message: Option<String>,
    cancel: Arc<AtomicBool>,
    events: broadcast::Sender<Event>,
    finished_at: Option<Instant>,
}

struct Store {
    jobs: HashMap<String, Job>,
    queue: VecDeque<String>,
    running: Option<String>,
    stopping: bool,
    ids: Random,
}

/// The store, shared by the HTTP handlers and the worker thread.
pub struct Jobs {
    store: Mutex<Store>,
    wake: Condvar,
    capacity: usize,
    keep: Duration,
}

impl Jobs {
    /// `capacity`: edits that may wait (the running one not counted); `keep`: how long a
    /// finished edit and its result stay.
    pub fn new(capacity: usize, keep: Duration) -> Self {
        Self {
            store: Mutex::new(Store {
                jobs: HashMap::new(),
                queue: VecDeque::new(),
                running: None,
                stopping: false,
                ids: Random::new(),
            }),
            wake: Condvar::new(),
            capacity,
            keep,
        }
    }

    pub fn keep(&self) -> Duration {
        self.keep
    }

    /// A known edit that has not expired (the sweeper may not have dropped it yet).
    fn find<'a>(&self, s: &'a Store, id: &str) -> Result<&'a Job, ApiError> {
        s.jobs
            .get(id)
            .filter(|job| job.finished_at.is_none_or(|t| t.elapsed() < self.keep))
            .ok_or_else(|| ApiError::not_found(id))
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic elsewhere never poisons the server for everyone after it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue an edit: its id and position, or 429 when the queue is full.
    pub fn submit(&self, params: EditParams, image: RgbImage) -> Result<(String, usize), ApiError> {
        let mut s = self.lock();
        if s.stopping {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        if s.queue.len() >= self.capacity {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({} edits waiting); try again when one has finished",
                    s.queue.len()
                ),
            ));
        }
        let id = format!("{:016x}", s.ids.next_u64());
        let (events, _) = broadcast::channel(64);
        let (width, height) = image.dimensions();
        s.jobs.insert(
            id.clone(),
            Job {
                params,
                width,
                height,
                image: Some(image),
                state: State::Queued,
                step: 0,
                preview: None,
                result: None,
                done: None,
                message: None,
                cancel: Arc::new(AtomicBool::new(false)),
                events,
                finished_at: None,
            },
        );
        s.queue.push_back(id.clone());
        let position = s.queue.len() - 1 + usize::from(s.running.is_some());
        drop(s);
        self.wake.notify_all();
        Ok((id, position))
    }

    /// The worker's next edit; blocks until there is one. `None` when the server stops.
    pub fn next(&self) -> Option<Work> {
        let mut s = self.lock();
        loop {
            if s.stopping {
                return None;
            }
            if let Some(id) = s.queue.pop_front() {
                let Some(job) = s.jobs.get_mut(&id) else {
                    continue;
                };
                let Some(image) = job.image.take() else {
                    continue;
                };
                job.state = State::Running;
                let steps = job.params.steps;
                let work = Work {
                    id: id.clone(),
                    params: job.params.clone(),
                    image,
                    cancel: job.cancel.clone(),
                };
                let _ = job.events.send(Event::Started { steps });
                s.running = Some(id);
                announce_positions(&s);
                return Some(work);
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The worker reports step `i` of `n`.
    pub fn step(&self, id: &str, i: usize, n: usize, preview: Arc<str>) {
        let mut s = self.lock();
        if let Some(job) = s.jobs.get_mut(id) {
            job.step = i;
            job.preview = Some(preview.clone());
            let _ = job.events.send(Event::Step { i, n, preview });
        }
    }

    /// The worker reports the end of an edit.
    pub fn finish(&self, id: &str, outcome: Outcome) {
        let mut s = self.lock();
        if s.running.as_deref() == Some(id) {
            s.running = None;
        }
        if let Some(job) = s.jobs.get_mut(id) {
            job.image = None;
            job.finished_at = Some(Instant::now());
            let event = match outcome {
                Outcome::Done { png, info } => {
                    job.state = State::Done;
                    job.step = job.params.steps;
                    job.result = Some(Arc::new(png));
                    job.done = Some(info.clone());
                    Event::Done(info)
                }
                Outcome::Error(message) => {
                    job.state = State::Error;
                    job.message = Some(message.clone());
                    Event::Error { message }
                }
                Outcome::Cancelled => {
                    job.state = State::Cancelled;
                    Event::Cancelled
                }
            };
            let _ = job.events.send(event);
        }
        announce_positions(&s);
    }

    /// Cancel a queued edit at once, or ask the running one to stop after its current step.
    /// Returns the state the edit is in afterwards (`cancelled`, or `running` until it stops).
    pub fn cancel(&self, id: &str) -> Result<State, ApiError> {
        let mut s = self.lock();
        let state = self.find(&s, id)?.state;
        match state {
            State::Queued => {
                s.queue.retain(|q| q != id);
                if let Some(job) = s.jobs.get_mut(id) {
                    job.state = State::Cancelled;
                    job.image = None;
                    job.finished_at = Some(Instant::now());
                    let _ = job.events.send(Event::Cancelled);
                }
                announce_positions(&s);
                Ok(State::Cancelled)
            }
            State::Running => {
                if let Some(job) = s.jobs.get(id) {
                    job.cancel.store(true, Ordering::Relaxed);
                }
                Ok(State::Running)
            }
            State::Cancelled => Ok(State::Cancelled),
            State::Done | State::Error => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("edit {id} has already finished ({state:?})").to_lowercase(),
            )),
        }
    }

    /// The state as `GET /api/edits/{id}` shows it.
    pub fn status(&self, id: &str) -> Result<Value, ApiError> {
        let s = self.lock();
        let job = self.find(&s, id)?;
        let mut v = json!({
            "id": id,
            "state": job.state,
            "step": job.step,
            "steps": job.params.steps,
            "width": job.width,
            "height": job.height,
            "params": &job.params,
        });
        if job.state == State::Queued {
            v["position"] = json!(position(&s, id));
        }
        if job.state == State::Running && job.cancel.load(Ordering::Relaxed) {
            v["cancelling"] = json!(true);
        }
        if let Some(done) = &job.done {
            v["done"] = json!(done);
            v["result"] = json!(format!("/api/edits/{id}/result.png"));
        }
        if let Some(m) = &job.message {
            v["message"] = json!(m);
        }
        if let Some(t) = job.finished_at {
            let left = self.keep.saturating_sub(t.elapsed());
            v["expires_in_s"] = json!(left.as_secs());
        }
        Ok(v)
    }

    /// The result PNG, once the edit is done.
    pub fn result(&self, id: &str) -> Result<Arc<Vec<u8>>, ApiError> {
        let s = self.lock();
        let job = self.find(&s, id)?;
        job.result.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "edit {id} has no result: it is {}",
                    serde_json::to_value(job.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            )
        })
    }

    /// The events so far (as a snapshot: where the edit is now) and a receiver for the rest;
    /// no receiver once the edit has finished.
    pub fn subscribe(
        &self,
        id: &str,
    ) -> Result<(Vec<Event>, Option<broadcast::Receiver<Event>>), ApiError> {
        let s = self.lock();
        let job = self.find(&s, id)?;
        let mut snapshot = Vec::new();
        match job.state {
            State::Queued => snapshot.push(Event::Queued {
                position: position(&s, id),
            }),
            State::Running => {
                snapshot.push(Event::Started {
                    steps: job.params.steps,
                });
                if let Some(preview) = &job.preview {
                    snapshot.push(Event::Step {
                        i: job.step,
                        n: job.params.steps,
                        preview: preview.clone(),
                    });
                }
            }
            State::Done => snapshot.extend(job.done.clone().map(Event::Done)),
            State::Error => snapshot.push(Event::Error {
                message: job.message.clone().unwrap_or_default(),
            }),
            State::Cancelled => snapshot.push(Event::Cancelled),
        }
        let rx = (!job.state.finished()).then(|| job.events.subscribe());
        Ok((snapshot, rx))
    }

    /// Drop finished edits older than `keep`; returns how many.
    pub fn expire(&self) -> usize {
        let mut s = self.lock();
        let before = s.jobs.len();
        let keep = self.keep;
        s.jobs
            .retain(|_, job| job.finished_at.is_none_or(|t| t.elapsed() < keep));
        before - s.jobs.len()
    }

    /// Stop: the worker ends after asking the running edit to cancel; queued edits are
    /// cancelled; every event stream ends.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopping = true;
        for job in s.jobs.values() {
            job.cancel.store(true, Ordering::Relaxed);
            if job.state == State::Queued {
                let _ = job.events.send(Event::Cancelled);
            }
        }
        s.queue.clear();
        s.jobs.clear();
        drop(s);
        self.wake.notify_all();
    }

    /// Edits waiting (not counting the running one).
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

fn position(s: &Store, id: &str) -> usize {
    s.queue.iter().position(|q| q == id).unwrap_or(0) + usize::from(s.running.is_some())
}

/// Tell every waiting edit its new position (after one left the queue or finished).
fn announce_positions(s: &Store) {
    let ahead = usize::from(s.running.is_some());
    for (i, id) in s.queue.iter().enumerate() {
        if let Some(job) = s.jobs.get(id) {
            let _ = job.events.send(Event::Queued {
                position: i + ahead,
            });
        }
    }
}
