package browser

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// loads serves a page that loads itself again every second and counts
// its loads, with a line that the page hides.
func loads(t *testing.T) (*httptest.Server, *atomic.Int64) {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, `<!DOCTYPE html>
<html><head><meta http-equiv="refresh" content="1"><title>loads</title></head>
<body><p id="n">load %d</p><p id="hidden" style="display: none">not shown</p></body></html>
`, n.Add(1))
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func TestWaitTextAcrossReloads(t *testing.T) {
	srv, n := loads(t)
	b := New(t)
	b.Open(t, srv.URL)
	if got := b.Text(t, "#n"); got != "load 1" {
		t.Fatalf("first load shows %q, want %q", got, "load 1")
	}
	// Visible text only: the hidden line is not part of the body's.
	if got := b.Text(t, "body"); strings.Contains(got, "not shown") {
		t.Fatalf("body text %q holds a hidden element's text", got)
	}
	got := b.WaitText(t, "#n", "load 3", 20*time.Second)
	if got != "load 3" {
		t.Fatalf("WaitText returned %q, want %q", got, "load 3")
	}
	if n.Load() < 3 {
		t.Fatalf("the page was served %d times, yet showed its third load", n.Load())
	}

	path := filepath.Join(t.TempDir(), "page.png")
	b.Screenshot(t, path)
	png, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Fatalf("screenshot is not a PNG: % x", png[:min(8, len(png))])
	}
}

// fatalTB records the first failure and ends the goroutine, as t.Fatal
// does.
type fatalTB struct {
	testing.TB
	mu  sync.Mutex
	msg string
}

func (f *fatalTB) Helper() {}

func (f *fatalTB) Fatalf(format string, a ...any) {
	f.mu.Lock()
	f.msg = fmt.Sprintf(format, a...)
	f.mu.Unlock()
	runtime.Goexit()
}

func TestWaitTextTimesOutWithLastText(t *testing.T) {
	srv, _ := loads(t)
	b := New(t)
	b.Open(t, srv.URL)
	f := &fatalTB{TB: t}
	done := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(done)
		b.WaitText(f, "#n", "never there", 2500*time.Millisecond)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("WaitText did not return within 30 s of a 2.5 s timeout")
	}
	took := time.Since(start)
	if took < 2500*time.Millisecond || took > 10*time.Second {
		t.Fatalf("WaitText with a 2.5 s timeout gave up after %v", took)
	}
	f.mu.Lock()
	msg := f.msg
	f.mu.Unlock()
	if !strings.Contains(msg, `"never there"`) || !strings.Contains(msg, "load ") {
		t.Fatalf("failure message %q does not name the text waited for and the last text seen", msg)
	}
	// The page reloaded meanwhile: the last text is a later load's.
	if strings.HasSuffix(msg, "\nload 1") {
		t.Fatalf("failure message %q shows the first load's text after 2.5 s of reloads", msg)
	}
}
