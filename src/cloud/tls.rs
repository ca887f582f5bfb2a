//! The rustls client configuration of the cloud link: TLS 1.3 only, mutual
//! TLS with the vehicle's certificate, and trust in the configured broker CA
//! alone.
//!
//! Nothing comes from the system trust store: a vehicle talks to one
//! broker, whose CA is part of its provisioning, and a public CA that signs
//! a certificate for that host name must not be enough to impersonate it.
//! The private key file must be readable by its owner only; it is read with
//! [`read_secret_text`], which refuses anything looser than 0600.
//!
//! The key's PEM text is zeroized when dropped. The DER copy inside
//! `PrivateKeyDer` and ring's signing key inside the returned config are not
//! (neither type offers it); they live as long as the link does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::service::keyfile::{KeyFileError, read_secret_text};

/// The three files of a mutual-TLS client identity, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The broker's CA certificate(s): the only roots trusted.
    pub ca: PathBuf,
    /// This client's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This client's private key (PKCS#8, SEC1 or PKCS#1), mode 0600.
    pub key: PathBuf,
}

/// Why a TLS client configuration could not be built. Every variant names
/// the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} file {path} is not valid PEM: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} file {path} holds no certificate (expected a PEM \"BEGIN CERTIFICATE\" block)")]
    NoCertificate { what: &'static str, path: PathBuf },
    /// The PEM wrapper is fine but what it wraps is not an X.509 certificate.
    #[error(
        "{what} file {path}: certificate {index} is not a valid X.509 certificate ({source}); the PEM block is intact, its content is not"
    )]
    BadCertificate {
        what: &'static str,
        path: PathBuf,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("CA file {path}: certificate {index} cannot be used as a trust anchor: {source}")]
    BadCa {
        path: PathBuf,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("private key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: KeyFileError,
    },
    #[error(
        "private key file {path} holds no private key (expected a PEM PKCS#8, EC or RSA private key block)"
    )]
    NoKey { path: PathBuf },
    #[error("private key file {key} does not fit certificate file {cert}: {source}")]
    BadKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS 1.3 with the ring provider is unavailable: {0}")]
    Provider(#[source] rustls::Error),
}

/// Build the client configuration for `files`: TLS 1.3 only, ring, roots
/// only from `files.ca`, client authentication with `files.cert` and
/// `files.key`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let chain = load_certs("certificate", &files.cert)?;
    let key = load_key(&files.key)?;
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Provider)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::BadKey {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            })?;
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let certs = load_certs("CA", path)?;
    let mut roots = RootCertStore::empty();
    for (index, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            index,
            source,
        })?;
    }
    Ok(roots)
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // A chain is a few kilobytes.
    let pem = crate::service::keyfile::read_bounded(path, 1024 * 1024).map_err(|source| {
        TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        }
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    // Parsed here, so that a damaged certificate is reported as one and
    // not later as a key that "does not fit" it.
    for (index, cert) in certs.iter().enumerate() {
        if let Err(source) = rustls::server::ParsedCertificate::try_from(cert) {
            return Err(TlsError::BadCertificate {
                what,
                path: path.to_owned(),
                index,
                source,
            });
        }
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read_secret_text(path).map_err(|source| TlsError::KeyFile {
        path: path.to_owned(),
        source,
    })?;
    match PrivateKeyDer::from_pem_slice(text.as_bytes()) {
        Ok(key) => Ok(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoKey {
            path: path.to_owned(),
        }),
        // The detail of a PEM error can quote a line of the file; for a key
        // file that line may be secret, so it is not echoed.
        Err(_) => Err(TlsError::Pem {
            what: "private key",
            path: path.to_owned(),
            detail: "malformed PEM".to_owned(),
        }),
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::service::keyfile::write_secret_text;
    use std::os::unix::fs::PermissionsExt;

    struct Pki {
        _dir: tempfile::TempDir,
        ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
        files: TlsFiles,
        other_key: PathBuf,
    }

    /// A throwaway CA and client certificate, written the way the dev PKI
    /// writes them (key 0600).
    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "broker CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["veh-a".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("veh.pem"),
            key: dir.path().join("veh.key"),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        write_secret_text(&files.key, &key.serialize_pem()).unwrap();
        let other_key = dir.path().join("other.key");
        write_secret_text(
            &other_key,
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        Pki {
            _dir: dir,
            ca,
            files,
            other_key,
        }
    }

    /// A broker certificate for `localhost`, issued by a fresh CA unless
    /// `issuer` is given, and the server side of a handshake with it that
    /// requires a client certificate from `client_ca`.
    fn server(client_ca: &Path, issuer: Option<&Pki>) -> rustls::ServerConnection {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(client_ca).unwrap() {
            client_roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(client_roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = match issuer {
            Some(p) => params.signed_by(&key, &p.ca).unwrap(),
            None => {
                let ca_key = rcgen::KeyPair::generate().unwrap();
                let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                ca_params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, "some other CA");
                ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
                params.signed_by(&key, &ca).unwrap()
            }
        };
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        rustls::ServerConnection::new(Arc::new(config)).unwrap()
    }

    /// Pump a handshake in memory (no sockets), as rustls's own tests do.
    fn handshake(
        client: &mut rustls::ClientConnection,
        server: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        fn transfer(
            from: &mut dyn FnMut(&mut Vec<u8>),
            to: &mut dyn FnMut(&mut &[u8]) -> Result<(), rustls::Error>,
        ) -> Result<bool, rustls::Error> {
            let mut buf = Vec::new();
            from(&mut buf);
            let mut rd = &buf[..];
            while !rd.is_empty() {
                to(&mut rd)?;
            }
            Ok(!buf.is_empty())
        }
        for _ in 0..20 {
            let a = transfer(
                &mut |b| {
                    while client.wants_write() {
                        client.write_tls(b).unwrap();
                    }
                },
                &mut |rd| {
                    server.read_tls(rd).unwrap();
                    server.process_new_packets().map(|_| ())
                },
            )?;
            let b = transfer(
                &mut |b| {
                    while server.wants_write() {
                        server.write_tls(b).unwrap();
                    }
                },
                &mut |rd| {
                    client.read_tls(rd).unwrap();
                    client.process_new_packets().map(|_| ())
                },
            )?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
            assert!(a || b, "handshake stalled");
        }
        panic!("handshake did not finish");
    }

    fn client(p: &Pki) -> rustls::ClientConnection {
        let config = client_config(&p.files).unwrap();
        rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap()
    }

    #[test]
    fn handshakes_tls13_with_a_client_certificate() {
        let p = pki();
        let mut c = client(&p);
        let mut s = server(&p.files.ca, Some(&p));
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        // The broker saw the vehicle's certificate.
        let presented = s.peer_certificates().unwrap();
        let ours = CertificateDer::from_pem_file(&p.files.cert).unwrap();
        assert_eq!(presented.first(), Some(&ours));
    }

    #[test]
    fn a_broker_certificate_from_another_ca_is_refused() {
        let p = pki();
        let mut c = client(&p);
        let mut s = server(&p.files.ca, None);
        let e = handshake(&mut c, &mut s).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{e:?}"
        );
    }

    #[test]
    fn missing_files_are_named() {
        let p = pki();
        for (files, what) in [
            (
                TlsFiles {
                    ca: p.files.ca.with_extension("nope"),
                    ..p.files.clone()
                },
                "ca.nope",
            ),
            (
                TlsFiles {
                    cert: p.files.cert.with_extension("nope"),
                    ..p.files.clone()
                },
                "veh.nope",
            ),
            (
                TlsFiles {
                    key: p.files.key.with_extension("nope"),
                    ..p.files.clone()
                },
                "veh.nope",
            ),
        ] {
            let e = client_config(&files).unwrap_err();
            assert!(
                matches!(e, TlsError::Read { .. } | TlsError::KeyFile { .. }),
                "{e}"
            );
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    /// A PEM block whose content is not a certificate is reported as a
    /// damaged certificate, not as a key that does not fit it.
    #[test]
    fn a_damaged_certificate_is_named_as_such() {
        let p = pki();
        let pem = std::fs::read_to_string(&p.files.cert).unwrap();
        // Keep the wrapper, break the DER: flip bytes in the middle of the base64.
        let lines: Vec<String> = pem
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 3 {
                    "A".repeat(l.len())
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&p.files.cert, lines.join("\n") + "\n").unwrap();
        let e = client_config(&p.files).unwrap_err();
        assert!(
            matches!(e, TlsError::BadCertificate { index: 0, .. }),
            "{e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("veh.pem") && text.contains("not a valid X.509"),
            "{text}"
        );
        assert!(!text.contains("does not fit"), "{text}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let p = pki();
        // The key file is PEM, but holds no certificate.
        let files = TlsFiles {
            ca: p.files.key.clone(),
            ..p.files.clone()
        };
        let e = client_config(&files).unwrap_err();
        assert!(
            matches!(&e, TlsError::NoCertificate { what: "CA", path } if *path == p.files.key),
            "{e}"
        );
        std::fs::write(&p.files.cert, "not pem at all\n").unwrap();
        let e = client_config(&p.files).unwrap_err();
        assert!(
            matches!(
                &e,
                TlsError::NoCertificate {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("veh.pem"), "{e}");
    }

    #[test]
    fn a_garbage_ca_is_refused() {
        let p = pki();
        std::fs::write(
            &p.files.ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = client_config(&p.files).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::BadCertificate {
                    what: "CA",
                    index: 0,
                    ..
                } | TlsError::Pem { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_loose_key_file_is_refused_with_the_fix() {
        let p = pki();
        std::fs::set_permissions(&p.files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = client_config(&p.files).unwrap_err();
        assert!(
            matches!(
                &e,
                TlsError::KeyFile {
                    source: KeyFileError::Permissions { mode: 0o644, .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_key_file_without_a_key_is_refused() {
        let p = pki();
        std::fs::remove_file(&p.files.key).unwrap();
        // A certificate where the key should be.
        let cert = std::fs::read_to_string(&p.files.cert).unwrap();
        write_secret_text(&p.files.key, &cert).unwrap();
        let e = client_config(&p.files).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        assert!(e.to_string().contains("veh.key"), "{e}");
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let p = pki();
        let files = TlsFiles {
            key: p.other_key.clone(),
            ..p.files.clone()
        };
        let e = client_config(&files).unwrap_err();
        assert!(matches!(e, TlsError::BadKey { .. }), "{e}");
        assert!(e.to_string().contains("other.key"), "{e}");
    }

    #[test]
    fn a_malformed_key_is_refused_without_echoing_it() {
        let p = pki();
        std::fs::remove_file(&p.files.key).unwrap();
        write_secret_text(
            &p.files.key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0c2VjcmV0!!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = client_config(&p.files).unwrap_err();
        assert!(
            matches!(e, TlsError::Pem { .. } | TlsError::BadKey { .. }),
            "{e}"
        );
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
    }
}
