package serve

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestConfinedRangeServer(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	os.MkdirAll(filepath.Join(root, "sub"), 0o755)
	os.WriteFile(filepath.Join(root, "a.overlay"), []byte("0123456789"), 0o644)
	os.WriteFile(filepath.Join(dir, "secret"), []byte("outside"), 0o644)
	os.Symlink(filepath.Join(dir, "secret"), filepath.Join(root, "abs-link"))
	os.Symlink("../secret", filepath.Join(root, "rel-link"))
	os.Symlink("a.overlay", filepath.Join(root, "inside-link"))

	var reqs []Request
	s, err := New(root, Options{Log: zerolog.Nop(), OnRequest: func(r Request) { reqs = append(reqs, r) }})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s)
	defer ts.Close()

	get := func(path, rng string) (int, string) {
		// Send the path as written: no client-side cleaning of "..".
		conn, err := net.Dial("tcp", ts.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		req := "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
		if rng != "" {
			req += "Range: " + rng + "\r\n"
		}
		conn.Write([]byte(req + "\r\n"))
		resp, err := http.ReadResponse(newReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/a.overlay", "bytes=2-5"); code != http.StatusPartialContent || body != "2345" {
		t.Fatalf("range: %d %q", code, body)
	}
	if code, body := get("/inside-link", ""); code != http.StatusOK || body != "0123456789" {
		t.Fatalf("symlink inside the root: %d %q", code, body)
	}
	for _, p := range []string{"/../secret", "/sub/../../secret", "/%2e%2e/secret", "/..%2fsecret", "/abs-link", "/rel-link", "/sub", "/", "/nope"} {
		code, body := get(p, "")
		if code == http.StatusOK || strings.Contains(body, "outside") {
			t.Errorf("%s: %d %q: served something outside the root or a directory", p, code, body)
		}
	}
	if len(reqs) == 0 || reqs[0].Range != "bytes=2-5" || reqs[0].Bytes != 4 || reqs[0].Status != http.StatusPartialContent {
		t.Fatalf("request log: %+v", reqs)
	}
}

func TestRateAndRTT(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), make([]byte, 200<<10), 0o644)
	// 1 MB/s with a 16 KiB bucket: 200 KiB takes at least 0.18 s.
	s, err := New(dir, Options{Rate: 1e6, RTT: 30 * time.Millisecond, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s)
	defer ts.Close()
	start := time.Now()
	resp, err := http.Get(ts.URL + "/f")
	if err != nil {
		t.Fatal(err)
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if took := time.Since(start); n != 200<<10 || took < 30*time.Millisecond+180*time.Millisecond {
		t.Fatalf("%d bytes in %s: faster than a 1 MB/s link with a 30 ms RTT allows", n, took)
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]float64{"38mbit": 38e6 / 8, "1Gbit": 1e9 / 8, "500kbit": 500e3 / 8, "5MB": 5e6, "0": 0, "": 0, "2.5mbit": 2.5e6 / 8} {
		got, err := ParseRate(in)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"fast", "-1mbit", "10", "mbit"} {
		if _, err := ParseRate(in); err == nil {
			t.Errorf("ParseRate(%q) succeeded", in)
		}
	}
}

func newReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }
