//! What a URL chosen by a model (or sent in a request) may reach: public addresses only,
//! unless the operator's allow list opens a range. Operator-declared tools are not checked:
//! their URLs are the operator's own.
//!
//! Two gates, so no spelling of an address slips through: [`check_url`] refuses IP
//! literals before anything is sent (the URL parser has already turned `2130706433` and
//! `0x7f.1` into `127.0.0.1`), and [`GuardedResolver`] resolves names itself and refuses
//! when *any* address is forbidden; the client connects only to the addresses it checked,
//! so a second, different answer from DNS (rebinding) is never asked for.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The operator's exceptions: `allow` opens ranges (an intranet deployment), `deny` closes
/// more than the built-in rules do.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AddressPolicy {
    /// A policy from CIDR ranges (`10.1.0.0/16`, `fd00::/8`; a bare address is one host).
    ///
    /// # Errors
    /// A sentence naming the entry that is not a range.
    pub fn new(allow: &[String], deny: &[String]) -> Result<AddressPolicy, String> {
        let parse = |entries: &[String]| {
            entries
                .iter()
                .map(|e| {
                    e.parse::<IpNet>()
                        .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| format!("{e:?} is not an address range"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(AddressPolicy {
            allow: parse(allow)?,
            deny: parse(deny)?,
        })
    }

    /// Whether `ip` may be connected to.
    ///
    /// # Errors
    /// Why not, naming the address and its kind.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        // `::ffff:10.0.0.1` is `10.0.0.1` to the network stack.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return Err(format!("{ip} is on the deny list"));
        }
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match forbidden_kind(ip) {
            Some(kind) => Err(format!("{ip} is a {kind} address")),
            None => Ok(()),
        }
    }
}

/// The kind of a non-public address, or `None` for a public one.
pub fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => v6_kind(v6),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (127, _, _) => "loopback",
        (0, _, _) => "this-network (0.0.0.0/8)",
        (10, _, _) | (192, 168, _) => "private",
        (172, _, _) if b & 0xf0 == 16 => "private",
        (169, 254, _) => "link-local (cloud metadata)",
        (100, _, _) if b & 0xc0 == 64 => "shared (CGNAT)",
        (192, 0, 0) => "protocol-assignment",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, _, _) if b & 0xfe == 18 => "benchmarking",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_kind(v4);
    }
    let s = ip.segments();
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    // Addresses that carry an IPv4 address inside: judged by what they carry.
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if s[..6] == [0; 6] {
        // IPv4-compatible `::a.b.c.d` (deprecated, still routed by some stacks).
        return v4_kind(embedded(s[6], s[7])).or(Some("IPv4-compatible"));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_kind(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return v4_kind(embedded(s[1], s[2]));
    }
    Some(match s[0] {
        x if x & 0xff00 == 0xff00 => "multicast",
        x if x & 0xfe00 == 0xfc00 => "unique-local",
        x if x & 0xffc0 == 0xfe80 => "link-local",
        x if x & 0xffc0 == 0xfec0 => "site-local",
        // Teredo hides its IPv4 address; documentation and discard prefixes route nowhere.
        0x2001 if s[1] == 0 => "Teredo",
        0x2001 if s[1] == 0x0db8 => "documentation",
        0x0100 if s[1..4] == [0, 0, 0] => "discard",
        _ => return None,
    })
}

/// Checks the scheme and host of a URL before it is requested: an IP literal must pass
/// the policy; `localhost` names are refused outright; other names are left to the
/// [`GuardedResolver`].
///
/// # Errors
/// Why the URL may not be fetched.
pub fn check_url(policy: &AddressPolicy, url: &reqwest::Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "only http and https URLs can be fetched, not {}:",
            url.scheme()
        ));
    }
    let host = url.host_str().ok_or("the URL has no host")?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return policy.check(ip);
    }
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Err(format!("{host} is a loopback name"));
    }
    Ok(())
}

/// The policy of `allow` and `deny` ranges, and a resolver that checks against it (with
/// `resolve`'s fixed answers instead of the system's resolver when any are given).
///
/// # Errors
/// An entry that is not an address range or an address.
pub fn guarded(
    allow: &[String],
    deny: &[String],
    resolve: &std::collections::BTreeMap<String, String>,
) -> Result<(Arc<AddressPolicy>, GuardedResolver), String> {
    let policy = Arc::new(AddressPolicy::new(allow, deny)?);
    if resolve.is_empty() {
        return Ok((policy.clone(), GuardedResolver::new(policy)));
    }
    let names = resolve
        .iter()
        .map(|(name, ip)| {
            ip.parse::<IpAddr>()
                .map(|ip| (name.clone(), vec![ip]))
                .map_err(|_| format!("resolve.{name}: {ip:?} is not an address"))
        })
        .collect::<Result<HashMap<_, _>, _>>()?;
    Ok((policy.clone(), GuardedResolver::with_names(policy, names)))
}

/// A `reqwest` resolver that checks every address a name resolves to.
pub struct GuardedResolver {
    policy: Arc<AddressPolicy>,
    /// Names with fixed answers instead of the system's resolver: for tests, which must
    /// never resolve real names.
    fixed: Option<Arc<HashMap<String, Vec<IpAddr>>>>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<AddressPolicy>) -> GuardedResolver {
        GuardedResolver {
            policy,
            fixed: None,
        }
    }

    /// A resolver that knows only `names` (any other name fails to resolve).
    pub fn with_names(policy: Arc<AddressPolicy>, names: HashMap<String, Vec<IpAddr>>) -> Self {
        GuardedResolver {
            policy,
            fixed: Some(Arc::new(names)),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let policy = self.policy.clone();
        let fixed = self.fixed.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match fixed {
                Some(names) => names
                    .get(&host)
                    .ok_or_else(|| format!("{host} does not resolve"))?
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, 0))
                    .collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            if addrs.is_empty() {
                return Err(format!("{host} does not resolve").into());
            }
            for addr in &addrs {
                policy
                    .check(addr.ip())
                    .map_err(|why| format!("{host} resolves to {why}"))?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &AddressPolicy, ip: &str) -> bool {
        policy.check(ip.parse().unwrap()).is_err()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        let p = AddressPolicy::default();
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(refused(&p, ip), "{ip} passed");
        }
    }

    #[test]
    fn public_addresses_pass() {
        let p = AddressPolicy::default();
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::",
        ] {
            assert!(!refused(&p, ip), "{ip} was refused");
        }
    }

    #[test]
    fn the_lists_open_and_close_ranges() {
        let p = AddressPolicy::new(
            &["10.1.0.0/16".into(), "fd00::/8".into()],
            &["8.8.4.4".into()],
        )
        .unwrap();
        assert!(!refused(&p, "10.1.2.3"));
        assert!(!refused(&p, "::ffff:10.1.2.3"));
        assert!(!refused(&p, "fd00::5"));
        assert!(refused(&p, "10.2.0.1"));
        assert!(refused(&p, "8.8.4.4"));
        assert!(AddressPolicy::new(&["ten".into()], &[]).is_err());
    }

    #[test]
    fn urls_are_checked_in_every_spelling() {
        let p = AddressPolicy::default();
        for url in [
            "http://127.0.0.1:8080/",
            "http://[::1]:8080/",
            "http://2130706433:8080/",
            "http://0x7f.1:8080/",
            "http://017700000001/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:8080/",
            "http://LOCALHOST./",
            "http://a.localhost/",
            "ftp://8.8.8.8/",
            "file:///etc/passwd",
        ] {
            let parsed = reqwest::Url::parse(url).unwrap();
            assert!(check_url(&p, &parsed).is_err(), "{url} passed");
        }
        let public = reqwest::Url::parse("https://example.com/page").unwrap();
        assert!(check_url(&p, &public).is_ok());
    }

    /// Through a real client: names that resolve to loopback are refused before any
    /// connection, which a local listener counting its accepts confirms; with loopback on
    /// the allow list the same request goes through. Only loopback is ever contacted.
    #[tokio::test]
    async fn the_resolver_refuses_before_connecting() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        crate::providers::install_crypto();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0_u8; 1024];
                    let _ = tcp.read(&mut buf).await;
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        let names: HashMap<String, Vec<IpAddr>> = [
            (
                "intranet.test".to_owned(),
                vec!["127.0.0.1".parse().unwrap()],
            ),
            (
                "mixed.test".to_owned(),
                vec![
                    "93.184.216.34".parse().unwrap(),
                    "127.0.0.1".parse().unwrap(),
                ],
            ),
        ]
        .into();
        let client = |policy: AddressPolicy| {
            reqwest::Client::builder()
                .no_proxy()
                .dns_resolver(GuardedResolver::with_names(Arc::new(policy), names.clone()))
                .build()
                .unwrap()
        };
        let guarded = client(AddressPolicy::default());
        for host in ["intranet.test", "mixed.test"] {
            let err = guarded
                .get(format!("http://{host}:{port}/"))
                .send()
                .await
                .unwrap_err();
            let chain = format!("{:?}", err);
            assert!(chain.contains("loopback"), "{host}: {chain}");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "a refused name was connected to"
        );
        let open = client(AddressPolicy::new(&["127.0.0.0/8".into()], &[]).unwrap());
        let ok = open
            .get(format!("http://intranet.test:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
