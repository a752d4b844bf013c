//! Async jobs over HTTP (a gateway started with `--redis`):
//! - `POST /v1/jobs` — a generations body (or an edit's, as JSON with base64
//!   `image`/`mask`) and `webhook_url`; checked as the synchronous routes
//!   check it (400 naming the field, never queued), then `202` with the
//!   job and its `Location`. An `Idempotency-Key` header returns the same
//!   job for the same key (per API key, a day).
//! - `GET /v1/jobs/{id}` — the job (`data: [{b64_json}]` once completed).
//! - `DELETE /v1/jobs/{id}` — cancel (a running job stops after its step).
//! - `GET /v1/jobs/{id}/events` — server-sent events: `progress`,
//!   `preview`, then the job under its final status's name.
//! - `GET /v1/jobs?status=…&limit=…` — the caller's jobs, newest first.
//!
//! Another key's job is 404, like an unknown one.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, Query, State as S};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::{HttpError, HttpResult};
use super::{authorization, encode_base64, State};
use crate::queue::doors::{refused, store_error, watch, Watched};
use crate::queue::{NewJob, Shared, Status};

pub fn routes() -> Router<State> {
    Router::new()
        .route("/v1/jobs", get(list).post(submit))
        .route("/v1/jobs/{id}", get(read).delete(cancel))
        .route("/v1/jobs/{id}/events", get(events))
}

/// The store and the caller's identity, or why not.
fn caller(http: &State, headers: &HeaderMap) -> HttpResult<(Shared, String)> {
    let jobs = http
        .service
        .jobs
        .clone()
        .ok_or_else(|| HttpError::from(crate::queue::doors::unserved()))?;
    let owner = http
        .service
        .keys
        .owner(authorization(headers).as_deref())
        .map_err(HttpError::from)?;
    Ok((jobs, owner))
}

fn text_field<'a>(body: &'a serde_json::Map<String, Value>, name: &str) -> HttpResult<&'a str> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(HttpError::invalid(name, "expected a string")),
    }
}

async fn submit(S(http): S<State>, headers: HeaderMap, body: Body) -> Response {
    let run = async {
        let (jobs, owner) = caller(&http, &headers)?;
        let body = http.json_object(body).await?;
        let webhook_url = text_field(&body, "webhook_url")?.to_string();
        let req = crate::http::openai::job_request(&http, &body)?;
        http.service
            .check(&req)
            .await
            .map_err(|s| crate::http::openai::renamed(s.into()))?;
        let idempotency_key = headers
            .get("idempotency-key")
            .map(|v| {
                v.to_str()
                    .map(str::to_string)
                    .map_err(|_| HttpError::invalid("Idempotency-Key", "not visible ASCII"))
            })
            .transpose()?
            .unwrap_or_default();
        let new = NewJob {
            request: req,
            webhook_url,
            idempotency_key,
        };
        let (id, fresh) = jobs
            .submit(&owner, new)
            .await
            .map_err(|r| HttpError::from(refused(r)))?;
        let job = jobs
            .owned(&id, &owner, false)
            .await
            .map_err(HttpError::from)?;
        let mut r = (StatusCode::ACCEPTED, axum::Json(job.to_json())).into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        if !fresh {
            r.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        Ok::<_, HttpError>(r)
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn read(S(http): S<State>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let run = async {
        let (jobs, owner) = caller(&http, &headers)?;
        let job = jobs
            .owned(&id, &owner, true)
            .await
            .map_err(HttpError::from)?;
        Ok::<_, HttpError>(super::json(job.to_json()))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn cancel(S(http): S<State>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    use crate::queue::store::Cancelled;
    let run = async {
        let (jobs, owner) = caller(&http, &headers)?;
        let store = |e: redis::RedisError| HttpError::from(store_error(&e));
        match jobs.store.cancel(&id, &owner).await.map_err(store)? {
            Cancelled::Missing => return Err(HttpError::not_found(format!("no job {id}"))),
            Cancelled::Finished(s) if s != Status::Cancelled => {
                return Err(HttpError {
                    status: StatusCode::CONFLICT,
                    param: None,
                    message: format!("job {id} is already {}", s.as_str()),
                })
            }
            _ => {}
        }
        let job = jobs
            .owned(&id, &owner, false)
            .await
            .map_err(HttpError::from)?;
        Ok::<_, HttpError>(super::json(job.to_json()))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(serde::Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
}

async fn list(S(http): S<State>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    let run = async {
        let (jobs, owner) = caller(&http, &headers)?;
        let status = match q.status.as_deref() {
            None | Some("") => None,
            Some(s) => Some(Status::parse(s).ok_or_else(|| {
                HttpError::invalid(
                    "status",
                    format_args!(
                        "`{s}`: expected queued, in_progress, completed, failed or cancelled"
                    ),
                )
            })?),
        };
        let limit = match q.limit.as_deref() {
            None | Some("") => 100,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| HttpError::invalid("limit", format_args!("`{l}`: 1 to 1000")))?,
        };
        let list = jobs
            .store
            .list(&owner, status, limit)
            .await
            .map_err(|e| HttpError::from(store_error(&e)))?;
        let data: Vec<Value> = list.iter().map(crate::queue::Job::to_json).collect();
        Ok::<_, HttpError>(super::json(json!({ "object": "list", "data": data })))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn sse_event(name: &str, data: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().event(name).data(data.to_string()))
}

async fn events(S(http): S<State>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let prepared = async {
        let (jobs, owner) = caller(&http, &headers)?;
        let job = jobs
            .owned(&id, &owner, false)
            .await
            .map_err(HttpError::from)?;
        Ok::<_, HttpError>((jobs, job))
    };
    let (jobs, job) = match prepared.await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let mut watched = watch(jobs, id);
    tokio::spawn(async move {
        if tx.send(sse_event("job", &job.to_json())).await.is_err() {
            return;
        }
        loop {
            // A client gone stops the watch (and its polling) at once, even
            // while the job waits in the queue and no event comes.
            let w = tokio::select! {
                () = tx.closed() => return,
                w = watched.recv() => match w {
                    Some(w) => w,
                    None => return,
                },
            };
            let msg = match w {
                Ok(Watched::Step(e)) => match e.event {
                    Some(sd_proto::v1::generate_event::Event::Progress(p)) => sse_event(
                        "progress",
                        &json!({
                            "step": p.step, "total": p.total, "elapsed": p.elapsed_seconds,
                            "progress": p.step as f32 / p.total.max(1) as f32,
                        }),
                    ),
                    Some(sd_proto::v1::generate_event::Event::Preview(p)) => sse_event(
                        "preview",
                        &json!({
                            "step": p.step,
                            "image": p.images.first().map(|i| encode_base64(&i.data)),
                        }),
                    ),
                    _ => continue,
                },
                Ok(Watched::End(job)) => {
                    let _ = tx
                        .send(sse_event(job.status.as_str(), &job.to_json()))
                        .await;
                    return;
                }
                Err(s) => {
                    let e = HttpError::from(s);
                    let _ = tx
                        .send(sse_event(
                            "error",
                            &json!({ "status": e.status.as_u16(), "message": e.message }),
                        ))
                        .await;
                    return;
                }
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response()
}
