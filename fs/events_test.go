package fs

import (
	"fmt"
	"strings"
	"testing"
)

// The event log keeps between maxLog and twice maxLog bytes of whole
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
	if l.size() != total {
		t.Fatalf("size %d, want %d bytes logged", l.size(), total)
	}
	if len(l.buf) < maxLog {
		t.Fatalf("the log kept %d bytes, less than %d", len(l.buf), maxLog)
	}
	p := make([]byte, 64)
	n := l.readAt(p, l.first)
	if first, _, _ := strings.Cut(string(p[:n]), "\n"); !strings.HasSuffix(first, " event") || !strings.HasSuffix(string(l.buf), "999999 event\n") {
		t.Fatalf("the log does not start on a whole line or lost the newest: %q", p[:n])
	}
	// A follower behind what was dropped reads from the oldest kept line.
	if n := l.readAt(p, 0); n == 0 {
		t.Fatal("a read from offset 0 returned nothing")
	}
}
