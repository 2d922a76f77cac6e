package fs_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// readAll reads a file front to back in 128 KiB reads, the size the kernel
// sends FUSE, after dropping its cached pages so every read reaches the
// file system.
func readAll(b *testing.B, path string, buf []byte) int64 {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
	var off int64
	for {
		n, err := f.ReadAt(buf, off)
		off += int64(n)
		if err != nil {
			return off
		}
	}
}

// plainLoopback presents one file through go-fuse without passthrough: each
// read is a pread spliced to the kernel, the way go-fuse's own loopback
// serves reads when passthrough is off.
type plainLoopback struct {
	fusefs.Inode
	f    *os.File
	size int64
}

func (n *plainLoopback) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = 0o444
	out.Size = uint64(n.size)
	return 0
}

func (n *plainLoopback) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *plainLoopback) Read(ctx context.Context, fh fusefs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return fuse.ReadResultFd(n.f.Fd(), off, len(dest)), 0
}

func mountOne(b *testing.B, name string, node fusefs.InodeEmbedder) string {
	dir := b.TempDir()
	root := &fusefs.Inode{}
	srv, err := fusefs.Mount(dir, root, &fusefs.Options{
		MountOptions: fuse.MountOptions{DirectMount: true, MaxReadAhead: 128 << 10},
		OnAdd: func(ctx context.Context) {
			root.AddChild(name, root.NewPersistentInode(ctx, node, fusefs.StableAttr{Mode: syscall.S_IFREG}), false)
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Unmount() })
	return filepath.Join(dir, name)
}

// BenchmarkReadPresent reads a 66 MiB memory image whose chunks are all
// present (base, cache and zero) through the mount, next to the same bytes
// read with pread, through go-fuse's loopback (which negotiates passthrough
// here), and through a go-fuse loopback without passthrough.
func BenchmarkReadPresent(b *testing.B) {
	// Changed chunks alternate with base chunks: the worst case, where no
	// two neighbouring chunks come from the same place.
	b.Run("alternating", func(b *testing.B) { benchReadPresent(b, 1) })
	// Changes in runs of 16 chunks (64 KiB), closer to what guests do.
	b.Run("runs", func(b *testing.B) { benchReadPresent(b, 16) })
}

func benchReadPresent(b *testing.B, run int) {
	v := newScaledVM(b, overlay.CodecZstd, 1<<20, 22, run)
	m, err := v.mount(b, "file://"+v.overlay, 30*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	m.awaitComplete(b, 2*time.Minute)
	plain := filepath.Join(v.dir, "extracted", overlay.MemoryFile)
	pf, err := os.Open(plain)
	if err != nil {
		b.Fatal(err)
	}
	defer pf.Close()
	size := int64(len(v.want[overlay.Memory]))

	loopRoot, err := fusefs.NewLoopbackRoot(filepath.Dir(plain))
	if err != nil {
		b.Fatal(err)
	}
	loopDir := b.TempDir()
	loopSrv, err := fusefs.Mount(loopDir, loopRoot, &fusefs.Options{MountOptions: fuse.MountOptions{DirectMount: true, MaxReadAhead: 128 << 10}})
	if err != nil {
		b.Fatal(err)
	}
	defer loopSrv.Unmount()

	paths := []struct{ name, path string }{
		{"pread", plain},
		{"loopback-passthrough", filepath.Join(loopDir, overlay.MemoryFile)},
		{"loopback", mountOne(b, "image", &plainLoopback{f: pf, size: size})},
		{"cloudletfs", m.path(overlay.Memory)},
	}
	buf := make([]byte, 128<<10)
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				if n := readAll(b, p.path, buf); n != size {
					b.Fatalf("read %d of %d bytes", n, size)
				}
			}
		})
	}
}

// BenchmarkDemandLatency measures how long a read of a chunk whose segment
// has not arrived waits, on a 38 Mbit/s link with a 20 ms RTT, with the
// stream idle and with it running. Each run makes one demand read per
// segment in the back half of the overlay, 100 ms apart, and reports p50,
// p99 and the bound per segment: RTT + segment ÷ rate + decode time.
func BenchmarkDemandLatency(b *testing.B) {
	v := newScaledVM(b, overlay.CodecXZ, 1<<20, 8, 16)
	const rate, rtt = 38e6 / 8, 20 * time.Millisecond
	f, err := os.Open(v.overlay)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	o, err := overlay.Open(f, fi.Size())
	if err != nil {
		b.Fatal(err)
	}
	segs := o.Manifest.Segments
	var bounds []time.Duration
	for i := len(segs) / 2; i < len(segs); i++ {
		start := time.Now()
		if _, err := o.ReadSegment(i); err != nil {
			b.Fatal(err)
		}
		bounds = append(bounds, rtt+time.Duration(float64(segs[i].Stored)/rate*1e9)+time.Since(start))
	}
	sort.Slice(bounds, func(i, j int) bool { return bounds[i] < bounds[j] })
	for _, stream := range []bool{false, true} {
		name := "idle"
		if stream {
			name = "streaming"
		}
		b.Run(name, func(b *testing.B) {
			var lat []time.Duration
			for b.Loop() {
				srv := newServer(b, filepath.Dir(v.overlay), rate, rtt)
				// A fresh cache each run, so every segment must travel.
				v.resetCache(b)
				m, err := v.mountWith(b, srv.URL+"/app.overlay", time.Minute, stream)
				if err != nil {
					b.Fatal(err)
				}
				for i := len(segs) - 1; i >= len(segs)/2; i-- {
					id := o.Manifest.Order[segs[i].First]
					start := time.Now()
					if _, err := m.readAt(id.Image, int64(id.Index)*int64(o.Header.ChunkSize), 4096); err != nil {
						b.Fatal(err)
					}
					lat = append(lat, time.Since(start))
					// Think time: the stream, if running, gets a segment
					// under way before the next demand.
					time.Sleep(100 * time.Millisecond)
				}
				m.unmount()
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(bounds[len(bounds)/2].Microseconds())/1000, "bound-p50-ms")
			b.ReportMetric(float64(bounds[len(bounds)-1].Microseconds())/1000, "bound-max-ms")
		})
	}
}

// BenchmarkDiscard punches 4 MiB holes in the memory image through the
// mount, the size QEMU's free-page reporting discards at a time. Each
// range is written first (untimed), so every punch discards 1024 chunks
// that hold bytes.
func BenchmarkDiscard(b *testing.B) {
	v := newScaledVM(b, overlay.CodecZstd, 1<<20, 22, 16)
	m, err := v.mount(b, "file://"+v.overlay, 30*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	m.awaitComplete(b, 2*time.Minute)
	f, err := os.OpenFile(m.path(overlay.Memory), os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	const n = 4 << 20
	data := bytes.Repeat([]byte{0xa5}, n)
	ranges := int64(len(v.want[overlay.Memory])) / n
	for i := int64(0); b.Loop(); i++ {
		off := i % ranges * n
		b.StopTimer()
		if _, err := f.WriteAt(data, off); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := syscall.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkImageIO is a guest's disk I/O through the mount, as fio does it
// with O_DIRECT and one request at a time (tools/bench-io.sh runs fio
// itself against a plain file and a loopback too): random 4 KiB writes,
// random 4 KiB reads of the chunks written, sequential 1 MiB writes. It
// exists to profile the mount (-cpuprofile): the test's own part is a
// system call per operation.
func BenchmarkImageIO(b *testing.B) {
	v := newScaledVM(b, overlay.CodecZstd, 1<<20, 22, 16)
	m, err := v.mount(b, "file://"+v.overlay, 30*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	m.awaitComplete(b, 2*time.Minute)
	f, err := os.OpenFile(m.path(overlay.Disk), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	region := int64(len(v.want[overlay.Disk])) &^ (1<<20 - 1)
	// O_DIRECT wants aligned buffers: a mapping is page-aligned.
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(buf)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	b.Run("seq-write-1M", func(b *testing.B) {
		b.SetBytes(1 << 20)
		for i := int64(0); b.Loop(); i++ {
			if _, err := f.WriteAt(buf, i<<20%region); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("rand-write-4K", func(b *testing.B) {
		b.SetBytes(4096)
		for b.Loop() {
			if _, err := f.WriteAt(buf[:4096], rng.Int64N(region/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("rand-write-4K-fsync", func(b *testing.B) {
		b.SetBytes(4096)
		for b.Loop() {
			if _, err := f.WriteAt(buf[:4096], rng.Int64N(region/4096)*4096); err != nil {
				b.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("rand-read-4K", func(b *testing.B) {
		b.SetBytes(4096)
		for b.Loop() {
			if _, err := f.ReadAt(buf[:4096], rng.Int64N(region/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("seq-read-1M", func(b *testing.B) {
		b.SetBytes(1 << 20)
		for i := int64(0); b.Loop(); i++ {
			if _, err := f.ReadAt(buf, i<<20%region); err != nil {
				b.Fatal(err)
			}
		}
	})
}
