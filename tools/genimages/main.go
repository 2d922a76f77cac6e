// Command genimages writes a synthetic base VM and a customized VM derived
// from it, for demos, tests and benchmarks. Pages mix what real guests hold:
// zero pages, text, binaries, incompressible data, copies of base content
// (a page cache of files on the disk) and repeats. The same seed always gives
// the same bytes.
//
//	go run ./tools/genimages -o DIR [-memory 256MiB] [-disk 512MiB] [-change 0.1] [-seed 1]
//
// DIR gets base/{disk.img,memory.img,state,vm.json} and
// custom/{disk.img,memory.img,state,vm.json}, and changed.bin: the custom
// chunks that differ from the base at the same offset, for size baselines.
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/dustin/go-humanize"
)

const page = 4096

var words = []string{"the", "cloudlet", "virtual", "machine", "resume", "overlay", "segment", "kernel",
	"memory", "disk", "offload", "mobile", "user", "latency", "network", "edge", "server", "request",
	"response", "image", "chunk", "cache", "process", "thread", "socket", "buffer", "config", "value",
	"error", "warning", "info", "debug", "start", "stop", "open", "close", "read", "write", "file", "path",
	"/usr/lib", "/etc/hosts", "libc.so.6", "HTTP/1.1", "200", "OK", "Content-Length:", "0x7fff", "main()",
	"return", "if", "else", "for", "while", "int", "char", "void", "static", "struct", "{", "}", ";"}

// kind of page content.
type kind int

const (
	kZero kind = iota
	kText
	kBinary
	kRandom
	kBaseDisk // copy of a base disk page
	kRepeat   // repeat of another new page of the same image
)

type mix []struct {
	k kind
	p float64
}

func (m mix) pick(r float64) kind {
	for _, e := range m {
		if r < e.p {
			return e.k
		}
		r -= e.p
	}
	return m[len(m)-1].k
}

var (
	baseMemMix  = mix{{kZero, .35}, {kText, .20}, {kBinary, .35}, {kRandom, .10}}
	baseDiskMix = mix{{kZero, .50}, {kText, .15}, {kBinary, .30}, {kRandom, .05}}
	custMemMix  = mix{{kText, .25}, {kBinary, .25}, {kBaseDisk, .20}, {kZero, .15}, {kRandom, .05}, {kRepeat, .10}}
	custDiskMix = mix{{kText, .30}, {kBinary, .30}, {kBaseDisk, .20}, {kZero, .10}, {kRandom, .10}}
)

// fill writes a page of kind k, seeded so the content depends only on seed.
func fill(b []byte, k kind, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	switch k {
	case kZero:
		clear(b)
	case kText:
		o := 0
		for o < len(b) {
			w := words[r.IntN(len(words))]
			o += copy(b[o:], w)
			if o < len(b) {
				if r.IntN(12) == 0 {
					b[o] = '\n'
				} else {
					b[o] = ' '
				}
				o++
			}
		}
	case kBinary:
		// Code and data: many zero bytes, small integers and repeated opcodes.
		for i := 0; i < len(b); i += 8 {
			v := r.Uint64()
			switch v & 3 {
			case 0:
				binary.LittleEndian.PutUint64(b[i:], 0)
			case 1:
				binary.LittleEndian.PutUint64(b[i:], v>>56)
			case 2:
				binary.LittleEndian.PutUint64(b[i:], 0x48894c2408ec8348^(v>>60))
			default:
				binary.LittleEndian.PutUint64(b[i:], v)
			}
		}
	case kRandom:
		for i := 0; i < len(b); i += 8 {
			binary.LittleEndian.PutUint64(b[i:], r.Uint64())
		}
	}
}

type image struct {
	name  string
	pages int
	base  mix
	cust  mix
	salt  uint64
}

func main() {
	out := flag.String("o", "", "output directory (required)")
	memS := flag.String("memory", "256MiB", "memory image size")
	diskS := flag.String("disk", "512MiB", "disk image size")
	change := flag.Float64("change", 0.10, "share of pages the custom VM changes")
	seed := flag.Uint64("seed", 1, "seed; the same seed gives the same images")
	flag.Parse()
	if *out == "" || *change < 0 || *change > 1 {
		flag.Usage()
		os.Exit(2)
	}
	mem, err1 := humanize.ParseBytes(*memS)
	disk, err2 := humanize.ParseBytes(*diskS)
	if err1 != nil || err2 != nil || mem%page != 0 || disk%page != 0 {
		fmt.Fprintln(os.Stderr, "genimages: sizes must be whole 4 KiB pages, e.g. 256MiB")
		os.Exit(2)
	}
	if err := run(*out, int(mem/page), int(disk/page), *change, *seed); err != nil {
		fmt.Fprintln(os.Stderr, "genimages:", err)
		os.Exit(1)
	}
}

func run(dir string, memPages, diskPages int, change float64, seed uint64) error {
	for _, d := range []string{"base", "custom"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	imgs := []image{
		{"disk.img", diskPages, baseDiskMix, custDiskMix, 1},
		{"memory.img", memPages, baseMemMix, custMemMix, 2},
	}
	// Plan the base: a kind per page.
	baseKind := make([][]kind, len(imgs))
	for n, im := range imgs {
		r := rand.New(rand.NewPCG(seed, im.salt))
		baseKind[n] = make([]kind, im.pages)
		for i := range baseKind[n] {
			baseKind[n][i] = im.base.pick(r.Float64())
		}
	}
	basePage := func(n, i int, b []byte) {
		fill(b, baseKind[n][i], seed<<40^uint64(n)<<32^uint64(i))
	}
	changed, err := os.Create(filepath.Join(dir, "changed.bin"))
	if err != nil {
		return err
	}
	defer changed.Close()
	for n, im := range imgs {
		if err := writeImage(filepath.Join(dir, "base", im.name), im.pages, func(i int, b []byte) { basePage(n, i, b) }); err != nil {
			return err
		}
		// The custom VM changes runs of pages, as files and allocations do.
		r := rand.New(rand.NewPCG(seed, im.salt+100))
		type edit struct {
			k   kind
			arg int
		}
		edits := map[int]edit{}
		var news []int
		for len(edits) < int(change*float64(im.pages)) {
			start, run := r.IntN(im.pages), 1+r.IntN(64)
			for i := start; i < min(im.pages, start+run); i++ {
				k := im.cust.pick(r.Float64())
				e := edit{k: k}
				switch k {
				case kBaseDisk:
					e.arg = r.IntN(diskPages)
				case kRepeat:
					if len(news) == 0 {
						e.k = kText
					} else {
						e.arg = news[r.IntN(len(news))]
					}
				}
				if e.k == kText || e.k == kBinary || e.k == kRandom {
					news = append(news, i)
				}
				edits[i] = e
			}
		}
		var custPage func(i int, b []byte)
		custPage = func(i int, b []byte) {
			e, ok := edits[i]
			switch {
			case !ok:
				basePage(n, i, b)
			case e.k == kBaseDisk:
				basePage(0, e.arg, b)
			case e.k == kRepeat:
				custPage(e.arg, b)
			default:
				fill(b, e.k, seed<<40^uint64(n+8)<<32^uint64(i))
			}
		}
		if err := writeImage(filepath.Join(dir, "custom", im.name), im.pages, custPage); err != nil {
			return err
		}
		// changed.bin: custom pages that differ from the base page at the same offset.
		a, b := make([]byte, page), make([]byte, page)
		for i := 0; i < im.pages; i++ {
			if _, ok := edits[i]; !ok {
				continue
			}
			basePage(n, i, a)
			custPage(i, b)
			if string(a) != string(b) {
				if _, err := changed.Write(b); err != nil {
					return err
				}
			}
		}
	}
	for _, d := range []struct {
		name string
		salt uint64
	}{{"base", 1}, {"custom", 2}} {
		state := make([]byte, 900<<10)
		for o := 0; o < len(state); o += page {
			k := kBinary
			if o/page%4 == 0 {
				k = kZero
			}
			fill(state[o:min(len(state), o+page)], k, seed<<40^d.salt<<32^uint64(o))
		}
		if err := os.WriteFile(filepath.Join(dir, d.name, "state"), state, 0o644); err != nil {
			return err
		}
		cfg := fmt.Sprintf("{\"machine\": \"pc\", \"memory\": %d, \"vm\": %q}\n", memPages*page, d.name)
		if err := os.WriteFile(filepath.Join(dir, d.name, "vm.json"), []byte(cfg), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// writeImage writes pages in parallel; gen must depend only on the page index.
func writeImage(path string, pages int, gen func(i int, b []byte)) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(int64(pages) * page); err != nil {
		return err
	}
	const batch = 256
	var wg sync.WaitGroup
	errs := make(chan error, runtime.NumCPU())
	next := make(chan int)
	for range runtime.NumCPU() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, batch*page)
			for first := range next {
				n := min(batch, pages-first)
				for i := range n {
					gen(first+i, buf[i*page:(i+1)*page])
				}
				if _, err := f.WriteAt(buf[:n*page], int64(first)*page); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for first := 0; first < pages; first += batch {
		next <- first
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return f.Close()
	}
}
