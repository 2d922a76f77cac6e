package fetch

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/serve"
)

func TestParseContentRange(t *testing.T) {
	for in, want := range map[string][3]int64{
		"bytes 0-255/1000":   {0, 255, 1000},
		"bytes 10-10/11":     {10, 10, 11},
		"bytes 100-199/*":    {100, 199, -1},
		"bytes 0-0/1":        {0, 0, 1},
		"bytes 5-9/10":       {5, 9, 10},
		"bytes 0-9999/10000": {0, 9999, 10000},
	} {
		a, b, c, err := parseContentRange(in)
		if err != nil || [3]int64{a, b, c} != want {
			t.Errorf("%q: %d %d %d %v, want %v", in, a, b, c, err, want)
		}
	}
	for _, in := range []string{"", "bytes", "bytes 5-4/10", "bytes 0-9/9", "bytes -1-3/10", "items 0-1/2", "bytes 0-1", "bytes a-b/c"} {
		if _, _, _, err := parseContentRange(in); err == nil {
			t.Errorf("%q parsed", in)
		}
	}
}

func TestOpenSource(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.overlay")
	os.WriteFile(p, []byte("0123456789"), 0o644)
	for _, ref := range []string{p, "file://" + p} {
		s, err := OpenSource(ref, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, err := s.ReadRange(context.Background(), 3, 4)
		if err != nil || string(b) != "3456" || s.Size() != 10 {
			t.Fatalf("%s: %q %v size %d", ref, b, err, s.Size())
		}
		if _, err := s.ReadRange(context.Background(), 8, 4); err == nil || !strings.Contains(err.Error(), "truncated") {
			t.Fatalf("read past the end: %v", err)
		}
	}
	if _, err := OpenSource("ftp://host/x", nil, nil); err == nil || !strings.Contains(err.Error(), "unsupported scheme") {
		t.Fatalf("ftp: %v", err)
	}
	if _, err := OpenSource(filepath.Join(dir, "missing"), nil, nil); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("missing file: %v", err)
	}
	if _, err := OpenOverlay(context.Background(), mustOpen(t, p)); err == nil || !strings.Contains(err.Error(), "header") {
		t.Fatalf("a file that is not an overlay: %v", err)
	}
}

func mustOpen(t *testing.T, p string) Source {
	s, err := OpenSource(p, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-255/1000", "bytes 100-199/*", "bytes 5-4/10", "bytes -1-3/10", "bytes 0-9223372036854775807/9223372036854775807"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		first, last, total, err := parseContentRange(v)
		if err != nil {
			return
		}
		if first < 0 || last < first || (total >= 0 && total <= last) {
			t.Fatalf("%q parsed to an impossible range %d-%d/%d", v, first, last, total)
		}
	})
}

func TestCredentialsAndTLS(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x"), []byte("0123456789"), 0o644)
	s, err := serve.New(dir, serve.Options{Token: "hunter2", Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tls := range []bool{false, true} {
		var ts *httptest.Server
		var client *http.Client
		if tls {
			ts = httptest.NewTLSServer(s)
			// Trusted only through --ca-cert.
			ca := filepath.Join(dir, "ca.pem")
			os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw}), 0o644)
			untrusted, _ := OpenSource(ts.URL+"/x", DefaultClient(nil), nil)
			if _, err := untrusted.ReadRange(ctx, 0, 1); err == nil || !strings.Contains(err.Error(), "certificate") {
				t.Fatalf("an unknown certificate was accepted: %v", err)
			}
			cfg, err := TLSConfig(ca)
			if err != nil {
				t.Fatal(err)
			}
			client = DefaultClient(cfg)
		} else {
			ts = httptest.NewServer(s)
		}
		defer ts.Close()
		// Without the token: a clear error that shows no secret.
		withPassword := strings.Replace(ts.URL, "://", "://user:hunter2@", 1) + "/x"
		src, _ := OpenSource(withPassword, client, nil)
		_, err := src.ReadRange(ctx, 2, 3)
		if err == nil || !strings.Contains(err.Error(), "credentials") || strings.Contains(err.Error()+src.String(), "hunter2") {
			t.Fatalf("no token: %v (%s)", err, src)
		}
		h, err := ParseHeaders([]string{"Authorization: Bearer hunter2"})
		if err != nil {
			t.Fatal(err)
		}
		src, _ = OpenSource(ts.URL+"/x", client, h)
		if b, err := src.ReadRange(ctx, 2, 3); err != nil || string(b) != "234" {
			t.Fatalf("with the token: %q %v", b, err)
		}
	}
	// A dead address: the error names the URL without the password.
	src, _ := OpenSource("http://user:hunter2@127.0.0.1:1/x", nil, nil)
	if _, err := src.ReadRange(ctx, 0, 1); err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("dead server: %v", err)
	}
	if _, err := ParseHeaders([]string{"Bearer hunter2"}); err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("bad header: %v", err)
	}
	// Nor the signature or session token of a presigned URL.
	presigned := "https://s3.example/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20261203%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Security-Token=tok3n&X-Amz-Signature=5ig"
	if shown := Redact(presigned); strings.Contains(shown, "tok3n") || strings.Contains(shown, "5ig") || !strings.Contains(shown, "X-Amz-Algorithm=AWS4-HMAC-SHA256") {
		t.Errorf("Redact(%q) = %q", presigned, shown)
	}
	src, _ = OpenSource("http://127.0.0.1:1/b/k?X-Amz-Signature=5ig", nil, nil)
	if _, err := src.ReadRange(ctx, 0, 1); err == nil || strings.Contains(err.Error(), "5ig") || strings.Contains(src.String(), "5ig") {
		t.Fatalf("dead server, presigned URL: %v", err)
	}
	// Passwords that keep a URL from parsing are not shown either.
	for _, ref := range []string{"https://u:hun/ter2@h/x", "https://u:hun ter2@h/x", "https://u:hun%zzter2@h/x", "https://u:hunter2@h/x"} {
		_, err := OpenSource(ref, nil, nil)
		shown := Redact(ref)
		if strings.Contains(shown, "ter2") || !strings.HasSuffix(shown, "@h/x") {
			t.Errorf("Redact(%q) = %q", ref, shown)
		}
		if err != nil && strings.Contains(err.Error(), "ter2") {
			t.Errorf("OpenSource(%q): %v", ref, err)
		}
	}
}

// connServer is an httptest server that counts the connections clients
// open to it.
func connServer(t *testing.T, h http.HandlerFunc, tls bool) (*httptest.Server, *atomic.Int32) {
	var conns atomic.Int32
	ts := httptest.NewUnstartedServer(h)
	ts.Config.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	if tls {
		ts.EnableHTTP2 = true
		ts.StartTLS()
	} else {
		ts.Start()
	}
	t.Cleanup(ts.Close)
	return ts, &conns
}

// A response that stops arriving mid-body is cut at the no-progress limit
// with ErrStalled, and the next read goes out on a new connection.
func TestNoProgressLimit(t *testing.T) {
	body := bytes.Repeat([]byte("x"), 1<<16)
	var stall atomic.Bool
	stall.Store(true)
	ts, conns := connServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", len(body)-1, len(body)))
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusPartialContent)
		if stall.Load() {
			w.Write(body[:len(body)/2])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			return
		}
		w.Write(body)
	}, false)
	src, err := OpenSource(ts.URL+"/x", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	const limit = 200 * time.Millisecond
	src.(*HTTPSource).SetNoProgress(limit)
	start := time.Now()
	_, err = src.ReadRange(context.Background(), 0, int64(len(body)))
	if took := time.Since(start); !errors.Is(err, ErrStalled) || took < limit || took > limit+2*time.Second {
		t.Fatalf("stalled body: %v after %s, want ErrStalled after %s", err, took, limit)
	}
	stall.Store(false)
	if b, err := src.ReadRange(context.Background(), 0, int64(len(body))); err != nil || !bytes.Equal(b, body) {
		t.Fatalf("read after the stall: %v", err)
	}
	if n := conns.Load(); n != 2 {
		t.Fatalf("%d connections, want the read after the stall on a second one", n)
	}
}

// Error replies are read to the end, so the connection serves the next
// request; a 403 names both of its causes.
func TestErrorBodyDrained(t *testing.T) {
	var n atomic.Int32
	ts, conns := connServer(t, func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) <= 3 {
			http.Error(w, strings.Repeat("refused ", 1000), http.StatusForbidden)
			return
		}
		w.Header().Set("Content-Range", "bytes 0-0/1")
		w.WriteHeader(http.StatusPartialContent)
		w.Write([]byte("x"))
	}, false)
	src, err := OpenSource(ts.URL+"/x", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		_, err := src.ReadRange(context.Background(), 0, 1)
		if err == nil || !Permanent(err) || !strings.Contains(err.Error(), "--header") || !strings.Contains(err.Error(), "permissions") {
			t.Fatalf("403: %v, want a permanent error naming credentials and permissions", err)
		}
	}
	if b, err := src.ReadRange(context.Background(), 0, 1); err != nil || string(b) != "x" {
		t.Fatalf("read after the errors: %q %v", b, err)
	}
	if c := conns.Load(); c != 1 {
		t.Fatalf("%d connections for four requests, want one", c)
	}
}

// Over https the default client speaks HTTP/2 where the server offers it.
func TestHTTP2(t *testing.T) {
	var proto atomic.Int32
	ts, _ := connServer(t, func(w http.ResponseWriter, r *http.Request) {
		proto.Store(int32(r.ProtoMajor))
		w.Header().Set("Content-Range", "bytes 0-0/1")
		w.WriteHeader(http.StatusPartialContent)
		w.Write([]byte("x"))
	}, true)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw}), 0o644)
	cfg, err := TLSConfig(ca)
	if err != nil {
		t.Fatal(err)
	}
	src, err := OpenSource(ts.URL+"/x", DefaultClient(cfg), nil)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := src.ReadRange(context.Background(), 0, 1); err != nil || string(b) != "x" {
		t.Fatalf("%q %v", b, err)
	}
	if p := proto.Load(); p != 2 {
		t.Fatalf("HTTP/%d, want HTTP/2", p)
	}
}
