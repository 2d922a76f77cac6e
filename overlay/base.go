package overlay

import (
	"crypto/sha256"
	"fmt"
	"io"
	"runtime"
	"sync"
)

// Base is the base VM an overlay is built against and extracted with: its
// images, opened for reading, and the chunk-hash index used for dedup.
type Base struct {
	ID     Digest
	Images [2]io.ReaderAt // by Image
	Index  *Index

	once   sync.Once
	lookup map[Digest]Ref
}

// Index holds the sha256 of every chunk of a base's disk and memory images.
// The last chunk of an image that is not a whole number of chunks is hashed
// as if padded with zeros, which is also what reading past the end of an
// image yields.
type Index struct {
	ChunkSize int
	Sizes     [2]int64
	Hashes    [2][]Digest
}

// Part is one file of a base, as it enters the base ID.
type Part struct {
	Name string // disk, memory, state or vm.json
	Size int64
	SHA  Digest // sha256 of the whole file
}

// BaseID is the identity of a base VM: a sha256 over the name, size and
// sha256 of each of its files, in the order given (disk, memory, state, and
// vm.json when there is one). docs/FORMAT.md gives the exact text.
func BaseID(parts []Part) Digest {
	h := sha256.New()
	fmt.Fprintf(h, "cloudletfs base v1\n")
	for _, p := range parts {
		fmt.Fprintf(h, "%s %d %s\n", p.Name, p.Size, p.SHA)
	}
	var d Digest
	h.Sum(d[:0])
	return d
}

// zeroDigest returns the sha256 of a chunk of zeros.
func zeroDigest(chunkSize int) Digest {
	return sha256.Sum256(make([]byte, chunkSize))
}

// baseRef returns the reference that reads chunk i of base image img.
func baseRef(img Image, i int) Ref {
	if img == Memory {
		return Ref{Kind: BaseMemory, Index: uint32(i)}
	}
	return Ref{Kind: BaseDisk, Index: uint32(i)}
}

// Lookup finds a base chunk with digest d: the first in the disk image, else
// the first in the memory image.
func (b *Base) Lookup(d Digest) (Ref, bool) {
	b.once.Do(func() {
		b.lookup = make(map[Digest]Ref, len(b.Index.Hashes[Disk])+len(b.Index.Hashes[Memory]))
		for _, img := range []Image{Memory, Disk} { // disk last, so it wins
			hs := b.Index.Hashes[img]
			for i := len(hs) - 1; i >= 0; i-- {
				b.lookup[hs[i]] = baseRef(img, i)
			}
		}
	})
	r, ok := b.lookup[d]
	return r, ok
}

// HashImage reads an image once and returns the sha256 of the whole file and
// of each chunk. Chunk hashing runs on workers goroutines (0 means all
// cores); progress, if set, is told of every block read.
func HashImage(r io.ReaderAt, size int64, chunkSize, workers int, progress func(int64)) (Digest, []Digest, error) {
	file := sha256.New()
	chunks, err := hashChunks(r, size, chunkSize, workers, file, progress)
	if err != nil {
		return Digest{}, nil, err
	}
	var d Digest
	file.Sum(d[:0])
	return d, chunks, nil
}

// hashChunks computes the per-chunk digests of an image, feeding the bytes in
// order to whole (if not nil) along the way.
func hashChunks(r io.ReaderAt, size int64, chunkSize, workers int, whole io.Writer, progress func(int64)) ([]Digest, error) {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	cs := int64(chunkSize)
	n := chunkCount(size, cs)
	out := make([]Digest, n)
	block := cs * int64(max(1, (4<<20)/chunkSize))

	type job struct {
		buf   []byte
		first int
	}
	jobs := make(chan job, workers)
	free := make(chan []byte, workers+2)
	for range workers + 2 {
		free <- make([]byte, block)
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pad := make([]byte, cs)
			for j := range jobs {
				for off := 0; off < len(j.buf); off += chunkSize {
					c := j.buf[off:min(off+chunkSize, len(j.buf))]
					if len(c) < chunkSize {
						copy(pad, c)
						clear(pad[len(c):])
						c = pad
					}
					out[j.first+off/chunkSize] = sha256.Sum256(c)
				}
				free <- j.buf[:cap(j.buf)]
			}
		}()
	}
	var err error
	for off := int64(0); off < size; off += block {
		buf := <-free
		buf = buf[:min(block, size-off)]
		if m, rerr := r.ReadAt(buf, off); m < len(buf) {
			if rerr == nil || rerr == io.EOF {
				rerr = fmt.Errorf("file ended at %d bytes, expected %d: did it change while being read?", off+int64(m), size)
			}
			err = rerr
			break
		}
		if whole != nil {
			whole.Write(buf)
		}
		jobs <- job{buf: buf, first: int(off / cs)}
		if progress != nil {
			progress(int64(len(buf)))
		}
	}
	close(jobs)
	wg.Wait()
	if err != nil {
		return nil, err
	}
	return out, nil
}
