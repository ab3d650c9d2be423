//! The HTTP routes: the page and the edit API.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt, stream};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::error::ApiError;
use crate::input::{prepare_image, read_submission};
use crate::jobs::{Event, Jobs, State as JobState};
use crate::worker::ModelInfo;

/// The page: one self-contained file (no CDN, the machine may be offline).
pub const PAGE: &str = include_str!("page.html");

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    pub jobs: Arc<Jobs>,
    pub info: Arc<ModelInfo>,
    pub max_upload_bytes: usize,
    pub max_image_pixels: u64,
}

pub fn router(app: App) -> Router {
    let limit = app.max_upload_bytes;
    Router::new()
        .route("/", get(page))
        .route("/api/info", get(info))
        .route("/api/edits", post(create))
        .route("/api/edits/{id}", get(status))
        .route("/api/edits/{id}/events", get(events))
        .route("/api/edits/{id}/cancel", post(cancel))
        .route("/api/edits/{id}/result.png", get(result))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn info(State(app): State<App>) -> Json<serde_json::Value> {
    let schedulers: Vec<_> = ip2p_sched::SchedulerKind::ALL
        .iter()
        .map(|k| k.short_name())
        .collect();
    Json(json!({
        "model": app.info.name,
        "default_scheduler": app.info.default_scheduler.short_name(),
        "schedulers": schedulers,
        "queue": { "capacity": app.jobs.capacity(), "waiting": app.jobs.waiting() },
        "limits": {
            "max_upload_bytes": app.max_upload_bytes,
            "max_image_pixels": app.max_image_pixels,
            "max_steps": crate::params::MAX_STEPS,
            "min_resolution": crate::params::MIN_RESOLUTION,
            "max_resolution": crate::params::MAX_RESOLUTION,
        },
        "keep_results_s": app.jobs.keep().as_secs(),
    }))
}

/// `POST /api/edits`: 202 `{id, position, seed, guidance, image_guidance, width, height}`.
async fn create(State(app): State<App>, req: Request) -> Result<Response, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > app.max_upload_bytes as u64
    {
        // Read (and drop) what the client is sending before answering: a client still
        // writing its body would otherwise see a broken pipe instead of the 413.
        drain(req.into_body(), 64 << 20).await;
        return Err(ApiError::too_large(format!(
            "the request is {len} bytes; the upload limit is {} bytes",
            app.max_upload_bytes
        )));
    }
    let (fields, bytes) = read_submission(req).await?;
    let params = fields.resolve(app.info.default_scheduler)?;
    let (resolution, factor, max) = (params.resolution, app.info.vae_factor, app.max_image_pixels);
    // Decoding and resizing a large image takes a while: off the async threads.
    let image = tokio::task::spawn_blocking(move || prepare_image(&bytes, resolution, factor, max))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the image: {e}"),
            )
        })??;
    let (width, height) = image.dimensions();
    let body = json!({
        "seed": params.seed,
        "guidance": params.guidance,
        "image_guidance": params.image_guidance,
        "steps": params.steps,
        "scheduler": params.scheduler,
        "width": width,
        "height": height,
    });
    let (id, position) = app.jobs.submit(params, image)?;
    let mut body = body;
    body["id"] = json!(id);
    body["position"] = json!(position);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/edits/{id}"))],
        Json(body),
    )
        .into_response())
}

async fn status(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    app.jobs.status(&id).map(Json)
}

async fn cancel(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let state = app.jobs.cancel(&id)?;
    let body = match state {
        JobState::Running => json!({ "id": id, "state": "running", "cancelling": true }),
        other => json!({ "id": id, "state": other }),
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

async fn result(State(app): State<App>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let png = app.jobs.result(&id)?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"ip2p-{id}.png\""),
            ),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
        ],
        png.as_ref().clone(),
    )
        .into_response())
}

/// Read and drop up to `cap` bytes of a body (10 s at most).
async fn drain(body: axum::body::Body, cap: u64) {
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    let read = async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len() as u64;
            if seen > cap {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), read).await;
}

/// `GET /api/edits/{id}/events`: where the edit is now, then every event until it finishes.
async fn events(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let (snapshot, rx) = app.jobs.subscribe(&id)?;
    let live = stream::unfold(rx, |rx| async move {
        let mut rx = rx?;
        loop {
            match rx.recv().await {
                Ok(event) => {
                    let next = (!event.is_final()).then_some(rx);
                    return Some((event, next));
                }
                // A slow client misses some steps, never the end.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let all = stream::iter(snapshot).chain(live).map(|e: Event| {
        Ok(SseEvent::default()
            .event(e.name())
            .data(e.data().to_string()))
    });
    Ok(Sse::new(all).keep_alive(KeepAlive::default()))
}
