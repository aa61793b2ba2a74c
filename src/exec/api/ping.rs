use axum::response::Response;

/// `GET /ping`: 200 with an empty body (behind the token when one is set, as with execd).
pub async fn ping() -> Response {
    super::empty_ok()
}
