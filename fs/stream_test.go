package fs_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/fs"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// A follower of streams/io that falls behind, reading through the mount
// with a small buffer while reads add lines past what the stream keeps,
// sees every line whole and once, in order, and for each run of lines
// dropped under it one marker line "# N lines dropped".
func TestStreamFollowerFallsBehind(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	m.awaitComplete(t, 60*time.Second)
	fs.SetStreamLimit(m.m, 1000)
	// O_DIRECT: each read is one request to the daemon, so one line.
	img, err := syscall.Open(m.path(overlay.Disk), syscall.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(img)
	buf, err := syscall.Mmap(-1, 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(buf)
	reads := 0 // the reads made; read i is of disk chunk i
	follow, err := os.Open(filepath.Join(m.dir, "streams", "io"))
	if err != nil {
		t.Fatal(err)
	}
	defer follow.Close()
	want, markers := 0, 0 // the read whose line is due next; markers seen
	followOnce := func(size int) int {
		b := make([]byte, size)
		n, _ := follow.Read(b)
		b = b[:n]
		if n == 0 {
			return 0
		}
		if b[n-1] != '\n' {
			t.Fatalf("a read of streams/io ended inside a line: %q", b)
		}
		for _, line := range strings.Split(string(b[:n-1]), "\n") {
			var dropped int
			if _, err := fmt.Sscanf(line, "# %d lines dropped", &dropped); err == nil {
				markers++
				want += dropped
				continue
			}
			var at float64
			var off, length int64
			if _, err := fmt.Sscanf(line, "%f read disk %d %d", &at, &off, &length); err != nil || length != 4096 {
				t.Fatalf("streams/io: half a line or a foreign one: %q", line)
			}
			if off != int64(want)*4096 {
				t.Fatalf("streams/io: the line of read %d, want that of read %d (a line twice, or lost without a marker)", off/4096, want)
			}
			want++
		}
		return n
	}
	for step := range 60 {
		for range 20 {
			if _, err := syscall.Pread(img, buf, int64(reads)*4096); err != nil {
				t.Fatal(err)
			}
			reads++
		}
		followOnce(100 + step*7)
	}
	for followOnce(4096) > 0 {
	}
	if want != reads {
		t.Fatalf("the follower accounted for %d reads of %d", want, reads)
	}
	if markers == 0 {
		t.Fatal("the follower never fell behind: the test proves nothing")
	}
	t.Logf("%d lines, %d markers", reads, markers)
}
