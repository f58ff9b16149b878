//! `ferrite certs dev`: a local certificate authority, a server certificate and device
//! certificates, so that TLS and mutual TLS run on a developer's machine in one command.
//! Not for production: the CA key sits in a plain file next to the certificates.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::tls::DEVICE_URI_PREFIX;

/// The subject CN of the CA `certs dev` makes; a `ca.pem` with another subject is not ours.
const CA_NAME: &str = "Ferrite development CA";

/// `ferrite certs ...`
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CertsCommand {
    /// Write a local CA, a server certificate for this machine, and device certificates.
    Dev(DevArgs),
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// Directory for the files (created if missing; an existing CA in it is reused).
    #[arg(long, default_value = "./ferrite-certs")]
    out: PathBuf,
    /// A device certificate for this device id (repeatable): ID.pem and ID.key.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// More names or addresses for the server certificate (repeatable), beside localhost,
    /// 127.0.0.1, ::1 and the host name.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Days the server and device certificates are valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Write the server certificate again even if one exists.
    #[arg(long)]
    renew: bool,
}

/// Runs `ferrite certs`.
pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Dev(a) => dev(a),
    }
}

fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    for d in &args.devices {
        ferrite_engine::ids::validate_device_id(d).with_context(|| format!("--device {d:?}"))?;
        // Its files would replace the CA's or the server's.
        if ["ca", "server"].contains(&d.as_str()) {
            bail!("--device {d:?}: a device cannot be named `ca` or `server` here (its files would replace those)");
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let dir = &args.out;
    let mut written = Vec::new();

    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let issuer = if ca_pem.exists() && ca_key.exists() {
        existing_ca(&ca_pem, &ca_key)?
    } else {
        let key = KeyPair::generate()?;
        let params = ca_params(10 * 365)?;
        let cert = params.self_signed(&key)?;
        write(&ca_pem, cert.pem().as_bytes(), false)?;
        write(&ca_key, key.serialize_pem().as_bytes(), true)?;
        written.extend([ca_pem.clone(), ca_key.clone()]);
        Issuer::new(params, key)
    };

    let (server_pem, server_key) = (dir.join("server.pem"), dir.join("server.key"));
    if args.renew || !server_pem.exists() || !server_key.exists() {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        if let Some(h) = host_name()
            && !names.contains(&h)
        {
            names.push(h);
        }
        names.extend(args.hosts.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, "ferrite server");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, args.days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&server_pem, cert.pem().as_bytes(), false)?;
        write(&server_key, key.serialize_pem().as_bytes(), true)?;
        written.extend([server_pem.clone(), server_key.clone()]);
    }

    for device in &args.devices {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, device.as_str());
        params.subject_alt_names = vec![SanType::URI(format!("{DEVICE_URI_PREFIX}{device}").try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, args.days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let (pem, key_path) = (dir.join(format!("{device}.pem")), dir.join(format!("{device}.key")));
        write(&pem, cert.pem().as_bytes(), false)?;
        write(&key_path, key.serialize_pem().as_bytes(), true)?;
        written.extend([pem, key_path]);
    }

    if written.is_empty() {
        println!(
            "nothing to write: {} already holds a CA and a server certificate (--renew, --device ID)",
            dir.display()
        );
    }
    for w in &written {
        println!("wrote {}", w.display());
    }
    let d = dir.display();
    println!();
    println!("TLS and mutual TLS for devices:");
    println!("  ferrite serve --tls-cert {d}/server.pem --tls-key {d}/server.key --tls-client-ca {d}/ca.pem");
    if let Some(device) = args.devices.first() {
        println!("A device with its certificate (register it first: ferrite device create {device}):");
        println!(
            "  mosquitto_pub -h localhost -p 8883 --cafile {d}/ca.pem --cert {d}/{device}.pem --key {d}/{device}.key \
             -i {device} -t devices/{device}/telemetry -m '{{\"temp\": 21.5}}' -q 1"
        );
    }
    Ok(())
}

/// The CA's parameters: the same every time, so that an existing `ca.key` signs with the
/// same issuer name and key identifier as the `ca.pem` beside it.
fn ca_params(days: u32) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name.push(DnType::OrganizationName, "Ferrite");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    Ok(params)
}

/// The CA already in the directory, if `certs dev` made it.
fn existing_ca(pem: &Path, key: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let certs = crate::tls::read_certs(pem, "the CA certificate")?;
    let name = certs
        .first()
        .and_then(|der| x509_certificate::X509Certificate::from_der(der.as_ref()).ok())
        .and_then(|c| c.subject_common_name())
        .unwrap_or_default();
    if name != CA_NAME {
        bail!(
            "{} is not a CA made by `ferrite certs dev` (its subject is {name:?}); use another --out directory",
            pem.display()
        );
    }
    let key_text = std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    let key_pair =
        KeyPair::from_pem(&key_text).with_context(|| format!("{} is not a PEM private key", key.display()))?;
    Ok(Issuer::new(ca_params(10 * 365)?, key_pair))
}

/// Valid from yesterday (clocks differ) for `days` days.
fn validity(params: &mut CertificateParams, days: u32) {
    use chrono::Datelike;
    let at = |d: chrono::DateTime<chrono::Utc>| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    let now = chrono::Utc::now();
    params.not_before = at(now - chrono::Duration::days(1));
    params.not_after = at(now + chrono::Duration::days(i64::from(days)));
}

fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && rcgen::string::Ia5String::try_from(s.as_str()).is_ok())
}

/// Writes a certificate (readable by all) or a private key (by the owner only).
fn write(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    if private {
        ferrite_identity::service::write_private(path, bytes).map_err(anyhow::Error::msg)
    } else {
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
    }
}
