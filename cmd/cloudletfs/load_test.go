package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// loadScale multiplies the size of the load test's VMs; the benchmark
// script raises it.
func loadScale(t *testing.T) int {
	s := os.Getenv("CLOUDLETFS_LOAD_SCALE")
	if s == "" {
		return 1
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("CLOUDLETFS_LOAD_SCALE=%q: want a positive integer", s)
	}
	return n
}

// readAll reads ranges of the images under dir from readers goroutines at
// once, each range checked against want, and returns the bytes read.
func readAll(dir string, want map[string][]byte, readers int, seed uint64) (int64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, readers)
	for g := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(g)))
			files := map[string]*os.File{}
			for name := range want {
				f, err := os.Open(filepath.Join(dir, name, "image"))
				if err != nil {
					errs <- err
					return
				}
				defer f.Close()
				files[name] = f
			}
			// Each reader covers an equal share of both images, in ranges
			// of 4 KiB to 256 KiB at random places.
			for name, b := range want {
				size := int64(len(b))
				for left := size / int64(readers); left > 0; {
					n := min(4096+rng.Int64N(252<<10), left)
					off := rng.Int64N(size - n + 1)
					got := make([]byte, n)
					if _, err := files[name].ReadAt(got, off); err != nil {
						errs <- fmt.Errorf("%s %d+%d: %w", name, off, n, err)
						return
					}
					if !bytes.Equal(got, b[off:off+n]) {
						errs <- fmt.Errorf("%s %d+%d: bytes differ", name, off, n)
						return
					}
					total.Add(n)
					left -= n
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return total.Load(), <-errs
}

// Eight mounts of different overlays, fed by one serve and sharing one
// state dir, each read by 32 readers at once from a cold cache: no errors,
// every byte right. The aggregate throughput is logged next to the same
// reads from the extracted files.
func TestLoadEightMounts(t *testing.T) {
	requireFUSE(t)
	const mounts, readers = 8, 32
	scale := loadScale(t)
	e := bigEnv(t, 512*scale, 256*scale)
	e.importBase("base", "base")
	want := make([]map[string][]byte, mounts)
	for i := range mounts {
		// Each overlay changes other chunks of the base in its own way.
		rng := rand.New(rand.NewPCG(uint64(i), 99))
		want[i] = map[string][]byte{}
		for _, name := range []string{"disk", "memory"} {
			b := e.read("base/" + name + ".img")
			for c := 0; c < len(b)/4096; c++ {
				if rng.IntN(3) == 0 {
					copy(b[c*4096:], randomBytes(rng, 4096))
				}
			}
			e.write(fmt.Sprintf("app%d/%s.img", i, name), b)
			want[i][name] = b
		}
		e.ok("overlay", "create", "--base", "base", "--disk", e.path(fmt.Sprintf("app%d/disk.img", i)),
			"--memory", e.path(fmt.Sprintf("app%d/memory.img", i)), "--state", e.path("app/state"),
			"--codec", "zstd", "--segment-size", "256KiB", "-o", e.path(fmt.Sprintf("srv/app%d.overlay", i)))
		// The baseline reads the same bytes from local files.
		e.write(fmt.Sprintf("local%d/disk/image", i), want[i]["disk"])
		e.write(fmt.Sprintf("local%d/memory/image", i), want[i]["memory"])
	}

	srv := e.start("serve", "--addr", "127.0.0.1:0", e.path("srv"))
	url := strings.Fields(srv.line(t))[3]
	procs := make([]*proc, mounts)
	for i := range mounts {
		mnt := e.path(fmt.Sprintf("mnt%d", i))
		os.MkdirAll(mnt, 0o755)
		t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
		procs[i] = e.start("mount", fmt.Sprintf("%s/app%d.overlay", url, i), mnt)
	}
	for i, p := range procs {
		if l := p.line(t); !strings.HasPrefix(l, "ready in ") {
			t.Fatalf("mount %d printed %q; stderr:\n%s", i, l, p.errText())
		}
	}

	run := func(dir func(i int) string) (int64, time.Duration) {
		t.Helper()
		start := time.Now()
		var total atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, mounts)
		for i := range mounts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n, err := readAll(dir(i), want[i], readers, uint64(i))
				total.Add(n)
				if err != nil {
					errs <- fmt.Errorf("mount %d: %w", i, err)
				}
			}()
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Minute):
			t.Fatal("readers not done within 5 minutes")
		}
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		return total.Load(), time.Since(start)
	}
	n, took := run(func(i int) string { return e.path(fmt.Sprintf("mnt%d", i)) })
	if t.Failed() {
		t.FailNow()
	}
	nb, tookb := run(func(i int) string { return e.path(fmt.Sprintf("local%d", i)) })
	mbps := func(n int64, d time.Duration) float64 { return float64(n) / d.Seconds() / (1 << 20) }
	t.Logf("load: %d mounts x %d readers, caches cold at mount, streams running, one serve on 127.0.0.1: %d MiB read and checked in %s, %.0f MiB/s aggregate; the same reads from local files: %.0f MiB/s; ratio %.2f",
		mounts, readers, n>>20, took.Round(time.Millisecond), mbps(n, took), mbps(nb, tookb), mbps(n, took)/mbps(nb, tookb))

	for i, p := range procs {
		e.ok("umount", e.path(fmt.Sprintf("mnt%d", i)))
		if err := p.wait(t); err != nil {
			t.Fatalf("mount %d exited with %v; stderr:\n%s", i, err, p.errText())
		}
		if s := p.errText(); strings.Contains(s, " ERR ") || strings.Contains(s, " WRN ") {
			t.Fatalf("mount %d logged errors:\n%s", i, s)
		}
	}
}
