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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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

/// The networks refused by default ([`super::DownloadOptions::default_deny`]): this host
/// (`0.0.0.0/8`, loopback), private (RFC 1918, CGNAT, IPv6 unique-local), link-local (cloud
/// metadata), multicast and broadcast. IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms of
/// an address are checked as the IPv4 address they carry ([`forms`]).
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// [`DEFAULT_DENY`] parsed.
pub fn default_deny() -> Vec<Cidr> {
    DEFAULT_DENY
        .iter()
        .filter_map(|c| parse_cidr(c).ok())
        .collect()
}

/// `addr` and the IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`) and 6to4
/// (`2002:AABB:CCDD::/48`).
pub(crate) fn forms(addr: IpAddr) -> Vec<IpAddr> {
    let mut out = vec![addr.to_canonical()];
    if let IpAddr::V6(v6) = addr {
        let bits = u128::from(v6);
        let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
        let seg = v6.segments();
        let compat = bits >> 32 == 0;
        let nat64 = bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000
            || (seg[0], seg[1], seg[2]) == (0x64, 0xff9b, 1);
        if compat || nat64 {
            out.push(IpAddr::V4(low32));
        }
        if seg[0] == 0x2002 {
            let v4 = (u32::from(seg[1]) << 16) | u32::from(seg[2]);
            out.push(IpAddr::V4(Ipv4Addr::from(v4)));
        }
    }
    out
}

/// Where downloads may connect: never into `deny`, and into `default_deny` only where
/// `allow` opens it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Destinations {
    pub deny: Vec<Cidr>,
    pub default_deny: Vec<Cidr>,
    pub allow: Vec<Cidr>,
}

impl Destinations {
    pub(crate) fn of(options: &super::DownloadOptions) -> Self {
        Self {
            deny: options.deny.clone(),
            default_deny: if options.default_deny {
                default_deny()
            } else {
                Vec::new()
            },
            allow: options.allow.clone(),
        }
    }

    /// The denied network `addr` (in any of its [`forms`]) is in, and whether it is one of the
    /// default ones.
    pub(crate) fn refused(&self, addr: IpAddr) -> Option<(Cidr, bool)> {
        let forms = forms(addr);
        let allowed = forms
            .iter()
            .any(|f| self.allow.iter().any(|n| in_cidr(*f, *n)));
        for f in &forms {
            if let Some(n) = self.deny.iter().find(|n| in_cidr(*f, **n)) {
                return Some((*n, false));
            }
        }
        if allowed {
            return None;
        }
        for f in &forms {
            if let Some(n) = self.default_deny.iter().find(|n| in_cidr(*f, **n)) {
                return Some((*n, true));
            }
        }
        None
    }

    /// Whether names are refused without resolving them (`localhost` and `*.localhost`,
    /// which resolvers may answer from anywhere).
    fn refuses_name(&self, host: &str) -> Option<Denied> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let local = host == "localhost" || host.ends_with(".localhost");
        let loopback: IpAddr = Ipv4Addr::LOCALHOST.into();
        if !local {
            return None;
        }
        let (network, default) = self.refused(loopback)?;
        Some(Denied {
            host,
            addr: loopback,
            network,
            default,
        })
    }
}

/// A connection refused because the host is (or resolves to) an address in a denied network.
/// Travels through reqwest's error chain, where [`super::error::find_cause`] finds it. It
/// names no port: a refusal says nothing of what listens there.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{host} is at {addr}, in the network {}/{} that downloads may not reach", .network.0, .network.1)]
pub(crate) struct Denied {
    pub host: String,
    pub addr: IpAddr,
    pub network: Cidr,
    /// The network is one of [`DEFAULT_DENY`] (opened by an allow list), not an explicit deny.
    pub default: bool,
}

/// Refuses when any of `addrs` is in a denied network: a host that resolves both inside and
/// outside is refused, whichever address a connection would pick.
pub(crate) fn check(
    dest: &Destinations,
    host: &str,
    addrs: impl IntoIterator<Item = IpAddr>,
) -> Result<(), Denied> {
    if let Some(d) = dest.refuses_name(host) {
        return Err(d);
    }
    for addr in addrs {
        if let Some((network, default)) = dest.refused(addr) {
            return Err(Denied {
                host: host.to_owned(),
                addr,
                network,
                default,
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

/// Checks an IP-literal host of `url`, and `localhost` (other host names are checked when
/// they are resolved).
pub(crate) fn check_url(dest: &Destinations, url: &Url) -> Result<(), Denied> {
    let host = url.host_str().unwrap_or_default();
    match ip_literal(url) {
        Some(addr) => check(dest, host, [addr]),
        None => check(dest, host, []),
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
pub(crate) fn redirect_policy(deny: Arc<Destinations>) -> reqwest::redirect::Policy {
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
    deny: Arc<Destinations>,
}

impl DenyingResolver {
    pub(crate) fn new(deny: Arc<Destinations>) -> Self {
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

    fn hard(cidrs: &[&str]) -> Destinations {
        Destinations {
            deny: cidrs.iter().map(|c| parse_cidr(c).unwrap()).collect(),
            ..Destinations::default()
        }
    }

    fn defaults(allow: &[&str]) -> Destinations {
        Destinations {
            default_deny: default_deny(),
            allow: allow.iter().map(|c| parse_cidr(c).unwrap()).collect(),
            ..Destinations::default()
        }
    }

    #[test]
    fn ip_literal_hosts_are_checked() {
        let deny = hard(&["169.254.0.0/16", "fe80::/10"]);
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
        assert!(!denied.default);
    }

    #[test]
    fn the_default_list_covers_every_range_and_form() {
        let d = defaults(&[]);
        let refused = [
            // this host, loopback
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "::",
            "::1",
            // RFC 1918, CGNAT
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            // link-local, unique-local, site-local
            "169.254.169.254",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "fec0::1",
            // multicast, broadcast, reserved
            "224.0.0.1",
            "239.255.255.250",
            "ff02::1",
            "255.255.255.255",
            "240.0.0.1",
            // IPv4-mapped, IPv4-compatible, NAT64 (well-known and local-use), 6to4
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.1.1.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::c0a8:101",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:c0a8:101::1",
        ];
        for a in refused {
            let addr: IpAddr = a.parse().unwrap();
            let got = d.refused(addr);
            assert!(
                got.is_some_and(|(_, default)| default),
                "{a} must be refused"
            );
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "64:ff9b::101:101",
            "2002:101:101::1",
            "::ffff:8.8.8.8",
        ];
        for a in public {
            assert_eq!(d.refused(a.parse().unwrap()), None, "{a} must pass");
        }
    }

    #[test]
    fn allow_opens_only_the_default_list() {
        let mut d = defaults(&["127.0.0.1/32", "10.1.0.0/16"]);
        assert_eq!(d.refused("127.0.0.1".parse().unwrap()), None);
        assert_eq!(d.refused("::ffff:127.0.0.1".parse().unwrap()), None);
        assert_eq!(d.refused("64:ff9b::a01:203".parse().unwrap()), None);
        assert!(d.refused("127.0.0.2".parse().unwrap()).is_some());
        assert!(d.refused("10.2.0.1".parse().unwrap()).is_some());
        // An explicit deny wins over the allow list.
        d.deny = vec![parse_cidr("127.0.0.1/32").unwrap()];
        assert_eq!(
            d.refused("127.0.0.1".parse().unwrap()),
            Some((parse_cidr("127.0.0.1/32").unwrap(), false))
        );
    }

    #[test]
    fn localhost_is_refused_by_name() {
        let d = defaults(&[]);
        let url = |s: &str| Url::parse(s).unwrap();
        for u in [
            "http://localhost:8081/metrics",
            "http://LOCALHOST./x",
            "http://a.localhost/x",
        ] {
            let e = check_url(&d, &url(u)).unwrap_err();
            assert!(!e.to_string().contains("8081"), "{e}");
        }
        assert!(check_url(&d, &url("http://localhost.example.org/x")).is_ok());
        assert!(check_url(&defaults(&["127.0.0.0/8"]), &url("http://localhost/x")).is_ok());
    }
}
