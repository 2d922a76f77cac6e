package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/cloudletfs/cloudletfs/fetch"
)

// TestStatusLines: every line status draws fits 80 columns, whatever the
// numbers and however long the last error of a failing segment, and the
// lines name the stall, the wait total and the failing segments.
func TestStatusLines(t *testing.T) {
	s := &fetch.Stats{
		Segments: 123456, SegmentsPresent: 99999, BytesFetched: 1 << 50, DemandFetches: 1234567,
		StallMs: 12345.6, WaitTotalMs: 98765.4, WaitP99Ms: 4321, FetchErrors: 123456789, Timeouts: 98765, CorruptSegments: 4242,
		FailingSegments: []fetch.SegmentFailure{
			{Segment: 17, Failures: 5, LastError: "GET http://127.0.0.1:8080/app.overlay: 500 Internal Server Error\nwith a body over lines", RetryInS: 42},
			{Segment: 123455, Failures: 123, LastError: strings.Repeat("corrupt ", 40), RetryInS: 300},
			{Segment: 3, Failures: 2, LastError: "wrong Content-Range", RetryInS: -1},
			{Segment: 4, Failures: 2, LastError: "404 Not Found"},
			{Segment: 5, Failures: 2, LastError: "403 Forbidden"},
		},
	}
	lines := statusLines(s, 1<<40)
	text := strings.Join(lines, "\n")
	for _, l := range lines {
		if n := utf8.RuneCountInString(l); n > statusWidth {
			t.Errorf("%d columns: %q", n, l)
		}
	}
	for _, want := range []string{"99999/123456 segments", "TiB/s", "stall 12.3 s", "wait total 98.8 s", "p99 4.3 s",
		"failing segment 17: 5 failures, retry in 42 s: GET http://127.0.0.1:8080/app.ov",
		"failing segment 123455", "failing segment 3: 2 failures, given up until remount: wrong Content-Range",
		"and 2 more failing segments", "errors 123456789"} {
		if !strings.Contains(text, want) {
			t.Errorf("status does not show %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "segment 4:") {
		t.Errorf("status shows more than three failing segments:\n%s", text)
	}
}

// TestStatusRateIsSmoothed: segments arrive whole, so the bytes fetched
// grow in steps; the rate status shows is the mean over the last seconds,
// not the last step or the pause between two.
func TestStatusRateIsSmoothed(t *testing.T) {
	var m rateMeter
	start := time.Unix(0, 0)
	var bytes int64
	// 1 MiB arrives at every whole second, sampled every 250 ms: 1 MiB/s.
	for i := 0; i <= 40; i++ {
		at := start.Add(time.Duration(i) * 250 * time.Millisecond)
		if i > 0 && i%4 == 0 {
			bytes += 1 << 20
		}
		r := m.add(at, bytes)
		if i == 0 {
			if r >= 0 {
				t.Fatalf("a rate %v from one sample", r)
			}
			continue
		}
		if at.Sub(start) >= rateWindow {
			if r < 0.75*(1<<20) || r > 1.25*(1<<20) {
				t.Fatalf("at %v the rate is %.0f B/s, want about 1 MiB/s", at.Sub(start), r)
			}
		}
	}
}

// TestStatusEnds: a mount that fetches on demand only is never complete,
// so status shows it once, says why, and exits 0; a stream+demand mount
// ends status when it is complete; a mount whose daemon died is named as
// such, with the command that cleans it.
func TestStatusEnds(t *testing.T) {
	requireFUSE(t)
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("app.overlay")
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })

	m := e.mount("--policy", "demand-only", e.path("app.overlay"), mnt)
	if b, err := os.ReadFile(filepath.Join(mnt, "stats")); err != nil || !strings.Contains(string(b), `"policy": "demand-only"`) {
		t.Fatalf("stats of a demand-only mount: %v\n%s", err, b)
	}
	st := e.start("status", "--interval", "50ms", mnt)
	var out []string
	for deadline := time.After(30 * time.Second); ; {
		var l string
		var more bool
		select {
		case l, more = <-st.lines:
		case <-deadline:
			t.Fatalf("status of a demand-only mount still runs after 30 s:\n%s", strings.Join(out, "\n"))
		}
		if !more {
			break
		}
		if utf8.RuneCountInString(l) > statusWidth {
			t.Fatalf("status line of %d columns: %q", utf8.RuneCountInString(l), l)
		}
		out = append(out, l)
	}
	if err := st.wait(t); err != nil {
		t.Fatalf("status of a demand-only mount: %v; stderr:\n%s", err, st.errText())
	}
	if len(out) < 2 || !strings.Contains(out[0], "segments") || !strings.Contains(out[len(out)-1], "on demand only") ||
		!strings.Contains(out[len(out)-1], "never completes") {
		t.Fatalf("status of a demand-only mount printed:\n%s", strings.Join(out, "\n"))
	}
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount: %v", err)
	}

	m = e.mount(e.path("app.overlay"), mnt)
	if b, err := os.ReadFile(filepath.Join(mnt, "stats")); err != nil || !strings.Contains(string(b), `"policy": "stream+demand"`) {
		t.Fatalf("stats of a stream+demand mount: %v\n%s", err, b)
	}
	st = e.start("status", "--interval", "50ms", mnt)
	if err := st.wait(t); err != nil {
		t.Fatalf("status of a stream+demand mount: %v; stderr:\n%s", err, st.errText())
	}

	// The daemon dies; status says so at its first read.
	m.cmd.Process.Kill()
	m.wait(t)
	out2, err := e.run("status", mnt)
	if err == nil || !strings.Contains(out2+err.Error(), "stopped without unmounting") ||
		!strings.Contains(out2+err.Error(), "cloudletfs umount "+mnt) {
		t.Fatalf("status of a dead mount: %v\n%s", err, out2)
	}
	e.ok("umount", mnt)
}
