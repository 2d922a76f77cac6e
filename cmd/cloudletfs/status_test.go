package main

import (
	"os"
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

// TestStatusEndsWithTheMount: a mount that fetches on demand only is never
// complete, so status shows it until the mount goes away, then says so and
// exits 0. A stream+demand mount ends status when it is complete.
func TestStatusEndsWithTheMount(t *testing.T) {
	requireFUSE(t)
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("app.overlay")
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })

	m := e.mount("--policy", "demand-only", e.path("app.overlay"), mnt)
	st := e.start("status", "--interval", "50ms", mnt)
	for range 3 {
		if l := st.line(t); utf8.RuneCountInString(l) > statusWidth {
			t.Fatalf("status line of %d columns: %q", utf8.RuneCountInString(l), l)
		}
	}
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount: %v", err)
	}
	var last string
	for l := range st.lines {
		last = l
	}
	if err := st.wait(t); err != nil || last != mnt+" is no longer mounted" {
		t.Fatalf("status after the unmount: %v, last line %q; stderr:\n%s", err, last, st.errText())
	}

	m = e.mount(e.path("app.overlay"), mnt)
	st = e.start("status", "--interval", "50ms", mnt)
	if err := st.wait(t); err != nil {
		t.Fatalf("status of a stream+demand mount: %v; stderr:\n%s", err, st.errText())
	}
	e.ok("umount", mnt)
	m.wait(t)
}
