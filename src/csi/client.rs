//! Connecting to a CSI socket, as the CO's sidecars do: used by the demo, the
//! benchmarks and the tests.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A gRPC channel to the driver listening on the Unix socket at `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    endpoint().connect_with_connector(to_socket(socket)).await
}

/// [`connect`], connecting at the first call rather than now.
pub fn connect_lazy(socket: &Path) -> Channel {
    endpoint().connect_with_connector_lazy(to_socket(socket))
}

/// The URI is required by the API but unused: every connection goes to the socket.
fn endpoint() -> Endpoint {
    Endpoint::from_static("http://kura.invalid")
}

fn to_socket(
    socket: &Path,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    let socket = socket.to_owned();
    tower::service_fn(move |_: Uri| {
        let socket = socket.clone();
        async move { Ok(TokioIo::new(UnixStream::connect(socket).await?)) }
    })
}
