//! Throwaway certificates for a local cluster (`eagle cluster up --tls`, `eagle cluster certs`):
//! a CA made on the spot, and one certificate it signs for `localhost` and `127.0.0.1`, valid
//! for both server and client authentication, which every local process presents.
//!
//! Invariant: the CA's private key is never written: nothing else can ever be signed by it, so
//! trusting `ca.pem` trusts exactly this cluster's processes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Where the files were written.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// The flags that give a service these files: `--tls-ca`, `--tls-cert`, `--tls-key`.
    pub fn args(&self) -> Vec<String> {
        self.flags("--tls")
    }

    /// The same for its connection to etcd: `--etcd-ca`, `--etcd-cert`, `--etcd-key`.
    pub fn etcd_args(&self) -> Vec<String> {
        self.flags("--etcd")
    }

    fn flags(&self, prefix: &str) -> Vec<String> {
        [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)]
            .into_iter()
            .flat_map(|(f, p)| [format!("{prefix}-{f}"), p.display().to_string()])
            .collect()
    }
}

/// Writes `ca.pem`, `cert.pem` and `key.pem` (mode 0600) into `dir`.
pub fn write(dir: &Path, name: &str) -> Result<CertFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} local CA"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;

    let files = CertFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.cert, cert.pem())?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    Ok(files)
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.create(true).write(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    o.open(path)
        .and_then(|mut f| f.write_all(data))
        .with_context(|| format!("writing {}", path.display()))
}
