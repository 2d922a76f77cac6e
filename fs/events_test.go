package fs

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// The event log keeps between its limit and twice its limit of whole
// lines, the newest always, and its offsets keep counting.
func TestEventLogBounded(t *testing.T) {
	var l eventLog
	var total int64
	for i := range 1_000_000 {
		line := fmt.Sprintf("%d event\n", i)
		l.add(line)
		total += int64(len(line))
		if n := len(l.buf); n > 2*maxLog+len(line) {
			t.Fatalf("after %d lines the log holds %d bytes", i+1, n)
		}
	}
	if size, _ := l.stat(); size != total {
		t.Fatalf("size %d, want %d bytes logged", size, total)
	}
	if len(l.buf) < maxLog {
		t.Fatalf("the log kept %d bytes, less than %d", len(l.buf), maxLog)
	}
	if !bytes.HasSuffix(l.buf, []byte("999999 event\n")) {
		t.Fatal("the log lost the newest line")
	}
	first, _, _ := bytes.Cut(l.buf, []byte("\n"))
	if n, err := strconv.Atoi(strings.TrimSuffix(string(first), " event")); err != nil || int64(n) != l.firstLine {
		t.Fatalf("the log does not start on a whole line, or miscounts the lines dropped (%d): %q", l.firstLine, first)
	}
}

// A follower that falls behind gets each line whole and once, in order, and
// for each run of lines dropped under it one marker line with their number.
// It is driven in steps, so that it falls behind for certain: each step adds
// lines past the bound and then reads once, with a buffer whose size varies
// so that reads end anywhere in a line.
func TestFollowerFallsBehind(t *testing.T) {
	l := &eventLog{limit: 2000}
	f := &follower{log: l}
	added, want := 0, 0 // lines added, and the number of the next line due
	markers := 0
	var off int64
	check := func(b []byte) {
		if len(b) == 0 {
			return
		}
		if b[len(b)-1] != '\n' {
			t.Fatalf("a read ended inside a line: %q", b)
		}
		for _, line := range strings.SplitAfter(string(b[:len(b)-1]), "\n") {
			line = strings.TrimSuffix(line, "\n")
			var n int
			if _, err := fmt.Sscanf(line, "# %d lines dropped", &n); err == nil {
				markers++
				want += n
				continue
			}
			i, err := strconv.Atoi(strings.TrimSuffix(line, " some event or other"))
			if err != nil || line != fmt.Sprintf("%d some event or other", i) {
				t.Fatalf("read half a line or a foreign one: %q", line)
			}
			if i != want {
				t.Fatalf("read line %d, want line %d (a line twice, or lost without a marker)", i, want)
			}
			want++
		}
	}
	read := func(size int) int {
		buf := make([]byte, size)
		r, errno := f.Read(context.Background(), buf, off)
		if errno != 0 {
			t.Fatal(errno)
		}
		b, _ := r.Bytes(nil)
		off += int64(len(b))
		check(b)
		return len(b)
	}
	for step := range 400 {
		for range 7 + step%50 {
			l.add(fmt.Sprintf("%d some event or other\n", added))
			added++
		}
		read(40 + step%97)
	}
	for read(4096) > 0 {
	}
	if want != added {
		t.Fatalf("the follower accounted for %d lines of %d", want, added)
	}
	if markers == 0 {
		t.Fatal("the follower never fell behind: the test proves nothing")
	}
	// A new open reads the stream from its start: the marker for every line
	// dropped so far, then the lines kept.
	f, off, want, markers = &follower{log: l}, 0, 0, 0
	for read(4096) > 0 {
	}
	if want != added || markers != 1 {
		t.Fatalf("a new open accounted for %d lines of %d with %d markers", want, added, markers)
	}
}
