//! Networks a download may not connect to ([`super::DownloadOptions::deny`]), enforced on
//! every connection rather than once up front:
//!
//! - HTTP(S): a DNS resolver refuses host names that resolve into a denied network, for the
//!   URL and for every redirect, on every attempt (so neither a redirect nor DNS rebinding
//!   between a check and the connect gets through); IP-literal hosts, which reqwest connects
//!   to without resolving, are checked before the first request and by the redirect policy,
//!   which also refuses redirects to schemes other than http and https.
//! - FTP(S): the control connection is made to the very addresses checked here, and the data
//!   connections reuse the control connection's peer address (PASV with the NAT workaround,
//!   EPSV), never an address the server announces.
//!
//! A proxy (`HTTP_PROXY`, `HTTPS_PROXY`) resolves the destination itself: then only the
//! proxy's address and IP-literal destinations are checked here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::error::BoxError;

/// A network: an address and a prefix length.
pub type Cidr = (IpAddr, u8);

/// Parses `a.b.c.d/n` or `x::y/n`.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s} is not a CIDR (address/length)"))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{ip} is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{len} is not a prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} exceeds {max}"));
    }
    Ok((ip, len))
}

/// Whether `addr` is in the network. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) count as
/// the IPv4 address they reach.
pub(crate) fn in_cidr(addr: IpAddr, (net, len): Cidr) -> bool {
    match (addr.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A connection refused because the host is (or resolves to) an address in a denied network.
/// Travels through reqwest's error chain, where [`super::error::find_cause`] finds it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{host} is at {addr}, in the network {}/{} that downloads may not reach", .network.0, .network.1)]
pub(crate) struct Denied {
    pub host: String,
    pub addr: IpAddr,
    pub network: Cidr,
}

/// Refuses when any of `addrs` is in a denied network: a host that resolves both inside and
/// outside is refused, whichever address a connection would pick.
pub(crate) fn check(
    deny: &[Cidr],
    host: &str,
    addrs: impl IntoIterator<Item = IpAddr>,
) -> Result<(), Denied> {
    for addr in addrs {
        if let Some(network) = deny.iter().copied().find(|n| in_cidr(addr, *n)) {
            return Err(Denied {
                host: host.to_owned(),
                addr,
                network,
            });
        }
    }
    Ok(())
}

/// The address of an IP-literal host of `url` (`http://10.0.0.1/`, `http://[::1]/`).
pub(crate) fn ip_literal(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Checks an IP-literal host of `url` (host names are checked when they are resolved).
pub(crate) fn check_url(deny: &[Cidr], url: &Url) -> Result<(), Denied> {
    match ip_literal(url) {
        Some(addr) => check(deny, url.host_str().unwrap_or_default(), [addr]),
        None => Ok(()),
    }
}

/// A redirect the downloader will not follow for another reason than the deny list.
#[derive(Clone, Debug, thiserror::Error)]
#[error("refused to follow a redirect to {url}: {reason}")]
pub(crate) struct RedirectRefused {
    pub url: String,
    pub reason: &'static str,
}

/// Most redirects followed for one request (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// The redirect policy: http and https targets only, not into a denied network, at most
/// [`MAX_REDIRECTS`].
pub(crate) fn redirect_policy(deny: Arc<[Cidr]>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let url = attempt.url();
        let refused = |reason| RedirectRefused {
            url: without_credentials(url),
            reason,
        };
        if !matches!(url.scheme(), "http" | "https") {
            let e = refused("only http and https redirects are followed");
            return attempt.error(e);
        }
        if attempt.previous().len() > MAX_REDIRECTS {
            let e = refused("more than 10 redirects");
            return attempt.error(e);
        }
        if let Err(e) = check_url(&deny, url) {
            return attempt.error(e);
        }
        attempt.follow()
    })
}

fn without_credentials(url: &Url) -> String {
    let mut url = url.clone();
    // Both only fail for URLs that cannot have credentials, which then have none.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// The system resolver, refusing names that resolve into a denied network.
pub(crate) struct DenyingResolver {
    deny: Arc<[Cidr]>,
}

impl DenyingResolver {
    pub(crate) fn new(deny: Arc<[Cidr]>) -> Self {
        Self { deny }
    }
}

impl Resolve for DenyingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let deny = Arc::clone(&self.deny);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            check(&deny, &host, addrs.iter().map(SocketAddr::ip))
                .map_err(|e| Box::new(e) as BoxError)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_addresses() {
        let link_local = parse_cidr("169.254.0.0/16").unwrap();
        assert!(in_cidr("169.254.169.254".parse().unwrap(), link_local));
        assert!(!in_cidr("127.0.0.1".parse().unwrap(), link_local));
        assert!(in_cidr(
            "::ffff:169.254.169.254".parse().unwrap(),
            link_local
        ));
        let v6 = parse_cidr("fe80::/10").unwrap();
        assert!(in_cidr("fe80::1".parse().unwrap(), v6));
        assert!(!in_cidr("::1".parse().unwrap(), v6));
        assert!(in_cidr(
            "10.1.2.3".parse().unwrap(),
            parse_cidr("0.0.0.0/0").unwrap()
        ));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense").is_err());
    }

    #[test]
    fn ip_literal_hosts_are_checked() {
        let deny = [
            parse_cidr("169.254.0.0/16").unwrap(),
            parse_cidr("fe80::/10").unwrap(),
        ];
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(check_url(&deny, &url("http://169.254.169.254/latest")).is_err());
        assert!(check_url(&deny, &url("http://[fe80::1]:8080/x")).is_err());
        assert!(check_url(&deny, &url("http://[::ffff:169.254.1.1]/x")).is_err());
        assert!(check_url(&deny, &url("http://127.0.0.1/x")).is_ok());
        assert!(check_url(&deny, &url("http://example.org/x")).is_ok());
        let denied = check(
            &deny,
            "h",
            ["1.2.3.4".parse().unwrap(), "169.254.0.1".parse().unwrap()],
        )
        .unwrap_err();
        assert_eq!(denied.addr, "169.254.0.1".parse::<IpAddr>().unwrap());
    }
}
