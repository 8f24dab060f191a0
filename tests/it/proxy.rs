//! A trip through a TLS-terminating reverse proxy (nginx) with a
//! self-signed certificate, under a path prefix: refused without
//! `--cacert`, whole with it.

use crate::util::*;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// nginx, stopped on drop.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx on 127.0.0.1 serving `https://127.0.0.1:PORT/bitfog/...` from
/// `upstream`, with the certificate `dir/cert.pem`.
fn nginx(dir: &Path, upstream: SocketAddr) -> (Nginx, u16) {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = dir.to_str().unwrap();
    // The request URI goes on exactly as it came (percent-encoding and
    // query and all), less the prefix: rewritten to the raw URI, the
    // prefix cut, and passed as $uri.
    let conf = format!(
        "daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/nginx.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {d}/t-body; proxy_temp_path {d}/t-proxy;
    fastcgi_temp_path {d}/t-fcgi; uwsgi_temp_path {d}/t-uwsgi; scgi_temp_path {d}/t-scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        client_max_body_size 0;
        location /bitfog/ {{
            rewrite ^ $request_uri;
            rewrite ^/bitfog(/.*) $1 break;
            return 400;
            proxy_pass http://{upstream}$uri;
            proxy_http_version 1.1;
            proxy_set_header Connection '';
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"
    );
    fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .args(["-c", &format!("{d}/nginx.conf"), "-p", d])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("this test needs nginx (apt-get install nginx-light; .ci/run does)");
    let nginx = Nginx(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            fs::read_to_string(dir.join("nginx.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (nginx, port)
}

#[test]
#[ignore = "needs nginx and openssl (.ci/run installs them)"]
fn a_trip_through_a_tls_proxy_under_a_prefix_needs_its_certificate() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    awkward_tree(&src);
    let server = Server::start(&t, "sites", &two_areas(&src, &dst));
    let d = t.mkdir("tls");
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        // A self-signed server certificate, not a CA's (which WebPKI
        // refuses as a server's own).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("this test needs openssl")
        .success();
    assert!(ok, "openssl made the certificate");
    let (_nginx, port) = nginx(&d, server.addr);
    let su = format!("https://127.0.0.1:{port}/bitfog/src/");
    let du = format!("https://127.0.0.1:{port}/bitfog/dst/");
    let cert = d.join("cert.pem");
    let cacert = cert.to_str().unwrap();

    // Without the certificate the proxy is not trusted.
    let r = bitfog(&["builddb", &su, &t.s("src.db")]).code(1);
    assert!(r.stderr.to_lowercase().contains("certificate"), "{r}");
    // With it, a whole trip through the prefix.
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db"), "--cacert", cacert]).ok();
    bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &su,
        &t.s("courier"),
        "--cacert",
        cacert,
    ])
    .ok();
    bitfog(&[
        "store",
        &t.s("src.db"),
        &du,
        &t.s("courier"),
        "--cacert",
        cacert,
    ])
    .ok();
    assert_same_tree(&src, &dst);
    // BITFOG_CACERT does the same; a file with no certificate is exit 2.
    let out = cmd(&["plan", &t.s("dest.db"), &su])
        .env("BITFOG_CACERT", &cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(t.path("empty.pem"), "").unwrap();
    bitfog(&["plan", &t.s("dest.db"), &su, "--cacert", &t.s("empty.pem")]).code(2);
}
