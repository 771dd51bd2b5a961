//! `GET /workers/connect`: the worker endpoint. The WebSocket is the HTTP layer's; what the
//! worker says is read by [`master::workers::serve`] as [`Frame`]s.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{Message, Utf8Bytes, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use kiln_protocol::MAX_MESSAGE_BYTES;
use master::server::Master;
use master::workers::{Frame, serve};

/// Bytes read from a worker's socket at a time. tungstenite's default, 128 KiB, is zeroed
/// before each read and so stays resident for every connection: 125 MiB for 1,000 workers
/// (the farm benchmark's W5). A larger frame (a 64 KiB log chunk) still arrives whole, over
/// several reads.
const READ_BUFFER_BYTES: usize = 16 << 10;

/// A text frame as it arrived (no copy: the master parses it in place).
struct Text(Utf8Bytes);

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.0.as_str()
    }
}

/// `GET /workers/connect`: upgrades to a WebSocket and hands it to the master.
pub async fn connect(State(master): State<Arc<Master>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            let (sink, stream) = socket.split();
            let stream = stream.map(|frame| match frame {
                Ok(Message::Text(text)) => Frame::Text(Text(text)),
                Ok(Message::Close(_)) => Frame::Close,
                Ok(_) => Frame::Other,
                Err(_) => Frame::Broken,
            });
            let sink = sink.with(|text: String| async move {
                Ok::<_, axum::Error>(Message::Text(text.into()))
            });
            serve(master, stream, Box::pin(sink))
        })
}
