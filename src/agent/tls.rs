//! Certificates and mutual TLS for the agent API.
//!
//! Two identities, each signed by the cluster's kura CA, each a directory in the
//! layout of a Kubernetes TLS Secret (`ca.crt`, `tls.crt`, `tls.key`):
//!
//! - the **controller** identity carries the DNS name [`CONTROLLER_NAME`] and is the
//!   only one whose control calls an agent accepts;
//! - the **node** identity carries the DNS name [`NODE_NAME`]; every agent serves with
//!   it, and the controller checks that name on the agent's certificate (agents are
//!   reached by IP address, so the TLS server name is set to [`NODE_NAME`] rather than
//!   taken from the address).
//!
//! The names are subject alternative names (DNS), checked as a TLS client checks a
//! server name; certificates from any CA (cert-manager, say) work if they carry them.
//! There is no plaintext mode.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// DNS name (subject alternative name) of the controller identity.
pub const CONTROLLER_NAME: &str = "kura-controller";
/// DNS name (subject alternative name) of the node identity.
pub const NODE_NAME: &str = "kura-node";

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lifetime of the certificates `kura certs` writes.
const VALIDITY_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite certificates")]
    Exists { path: PathBuf },
    #[error("making certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// One identity's files, as read from a `--tls-dir`.
#[derive(Clone)]
pub struct Files {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Files {
    // The key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files").finish_non_exhaustive()
    }
}

impl Files {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(io("read", &path))
        };
        Ok(Files {
            ca: read("ca.crt")?,
            cert: read("tls.crt")?,
            key: read("tls.key")?,
        })
    }

    /// The agent's server side: serves with this identity and requires a client
    /// certificate signed by the CA (any other connection fails its handshake).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The controller's client side: presents this identity and accepts only a server
    /// certificate signed by the CA that carries [`NODE_NAME`].
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(NODE_NAME)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// Whether the peer's leaf certificate carries the DNS name `name`. The handshake has
/// already checked the chain up to the CA.
pub fn peer_has_name(certs: Option<&[CertificateDer<'static>]>, name: &str) -> bool {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Whether the caller of `request` presented an identity naming `name`.
pub fn caller_is<T>(request: &tonic::Request<T>, name: &str) -> bool {
    let certs = request.peer_certs();
    peer_has_name(certs.as_deref().map(Vec::as_slice), name)
}

/// Writes a new CA and the two identities under `out`: `out/ca.crt`,
/// `out/controller/{ca.crt,tls.crt,tls.key}` and `out/node/{ca.crt,tls.crt,tls.key}`.
/// Keys get mode 0600. The CA's key is not kept: no further identity can be signed
/// with it, and nothing can leak it.
pub fn write_certs(out: &Path) -> Result<(), Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    for path in [out.join("controller"), out.join("node")] {
        if path.exists() {
            return Err(Error::Exists { path });
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(VALIDITY_DAYS);
    };

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kura CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    std::fs::create_dir_all(out).map_err(io("mkdir", out))?;
    write_file(&out.join("ca.crt"), ca_pem.as_bytes(), 0o644)?;
    let identities = [
        (
            "controller",
            CONTROLLER_NAME,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
        (
            "node",
            NODE_NAME,
            // Server for the controller; client for node-to-node transfers.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
    ];
    for (dir, name, usages) in identities {
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        write_file(&dir.join("ca.crt"), ca_pem.as_bytes(), 0o644)?;
        write_file(&dir.join("tls.crt"), cert.pem().as_bytes(), 0o644)?;
        write_file(&dir.join("tls.key"), key.serialize_pem().as_bytes(), 0o600)?;
    }
    Ok(())
}

/// Creates `path` with `mode` from the start, so a key is never readable by others.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.sync_all().map_err(io("fsync", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn leaf(dir: &Path) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(dir.join("tls.crt")).unwrap();
        rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
            .collect::<Result<Vec<CertificateDer<'static>>, _>>()
            .unwrap()
    }

    #[test]
    fn writes_both_identities_with_private_keys_and_their_names() {
        let dir = tempfile::tempdir().unwrap();
        write_certs(dir.path()).unwrap();
        for role in ["controller", "node"] {
            let role_dir = dir.path().join(role);
            Files::read(&role_dir).unwrap();
            let mode = std::fs::metadata(role_dir.join("tls.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{role}");
        }
        let controller = leaf(&dir.path().join("controller"));
        let node = leaf(&dir.path().join("node"));
        assert!(peer_has_name(Some(&controller), CONTROLLER_NAME));
        assert!(!peer_has_name(Some(&controller), NODE_NAME));
        assert!(peer_has_name(Some(&node), NODE_NAME));
        assert!(!peer_has_name(Some(&node), CONTROLLER_NAME));
        assert!(!peer_has_name(None, CONTROLLER_NAME));
        assert!(!peer_has_name(Some(&[]), CONTROLLER_NAME));
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        write_certs(dir.path()).unwrap();
        assert!(matches!(write_certs(dir.path()), Err(Error::Exists { .. })));
    }
}
