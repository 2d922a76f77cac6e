package store

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Key layout:
//
//	base/<id hex>                      -> JSON Base
//	basename/<name>                    -> id hex
//	baseidx/<id hex>/<image>/<block>   -> up to hashesPerBlock sha256s
const hashesPerBlock = 32768 // 1 MiB values

// File is one file of a base as it was at import.
type File struct {
	Path    string         `json:"path"`
	Size    int64          `json:"size"`
	ModTime int64          `json:"mtime_ns"`
	SHA     overlay.Digest `json:"sha256"`
}

// Base is a registered base VM.
type Base struct {
	ID        overlay.Digest `json:"id"`
	Name      string         `json:"name"`
	ChunkSize int            `json:"chunk_size"`
	Disk      File           `json:"disk"`
	Memory    File           `json:"memory"`
	State     File           `json:"state"`
	VMConfig  *File          `json:"vm_config,omitempty"`
	Imported  time.Time      `json:"imported"`
}

// Files returns the base's files with their names, in base-ID order.
func (b *Base) Files() []struct {
	Name string
	File File
} {
	out := []struct {
		Name string
		File File
	}{{"disk", b.Disk}, {"memory", b.Memory}, {"state", b.State}}
	if b.VMConfig != nil {
		out = append(out, struct {
			Name string
			File File
		}{"vm.json", *b.VMConfig})
	}
	return out
}

// ImportFiles names the files of a base to import.
type ImportFiles struct {
	Disk, Memory, State string
	VMConfig            string // optional
}

// Import hashes a base's files, builds its chunk index and registers it
// under name. The files stay where they are; the registry remembers their
// paths, sizes and modification times to notice later changes.
func (s *Store) Import(name string, in ImportFiles, chunkSize, workers int, progress func(n, total int64)) (*Base, error) {
	return s.ImportContext(context.Background(), name, in, chunkSize, workers, progress)
}

// ImportContext is Import that stops, registering nothing, once ctx ends.
func (s *Store) ImportContext(ctx context.Context, name string, in ImportFiles, chunkSize, workers int, progress func(n, total int64)) (*Base, error) {
	if name == "" || strings.ContainsAny(name, "/\n") {
		return nil, fmt.Errorf("base name %q: use a non-empty name without '/' or newlines", name)
	}
	if _, err := s.lookupName(name); err == nil {
		return nil, fmt.Errorf("a base named %q is already registered: pick another name or remove it with `cloudletfs base rm %s`", name, name)
	}
	paths := []string{in.Disk, in.Memory, in.State}
	if in.VMConfig != "" {
		paths = append(paths, in.VMConfig)
	}
	names := []string{"disk", "memory", "state", "vm.json"}
	var total int64
	files := make([]File, len(paths))
	for i, p := range paths {
		f, err := statFile(names[i], p)
		if err != nil {
			return nil, err
		}
		files[i] = f
		total += f.Size
	}
	var prog func(int64)
	if progress != nil {
		prog = func(n int64) { progress(n, total) }
	}
	idx := &overlay.Index{ChunkSize: chunkSize}
	var parts []overlay.Part
	for i := range files {
		fh, err := os.Open(files[i].Path)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", names[i], paths[i], err)
		}
		sum, hs, err := overlay.HashImage(ctxReader{ctx, fh}, files[i].Size, chunkSize, workers, prog)
		fh.Close()
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", names[i], paths[i], err)
		}
		files[i].SHA = sum
		if i < 2 {
			idx.Hashes[i] = hs
			idx.Sizes[i] = files[i].Size
		}
		parts = append(parts, overlay.Part{Name: names[i], Size: files[i].Size, SHA: sum})
	}
	b := &Base{ID: overlay.BaseID(parts), Name: name, ChunkSize: chunkSize,
		Disk: files[0], Memory: files[1], State: files[2], Imported: time.Now().UTC()}
	if len(files) > 3 {
		b.VMConfig = &files[3]
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if old, err := s.lookupID(b.ID.String()); err == nil {
		return nil, fmt.Errorf("this base is already registered as %q (ID %s)", old.Name, b.ID)
	}
	// The index goes to Badger's value log through a mapping, as 1 MiB
	// values.
	if err := freeSpace(s.dir, SpaceReserve+int64(len(idx.Hashes[0])+len(idx.Hashes[1]))*32); err != nil {
		return nil, err
	}
	if err := s.put(b, idx); err != nil {
		return nil, err
	}
	return b, nil
}

func statFile(name, path string) (File, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return File{}, fmt.Errorf("%s %s: %w", name, path, err)
	}
	st, err := os.Stat(abs)
	if err != nil {
		return File{}, fmt.Errorf("%s %s: %w", name, path, err)
	}
	if !st.Mode().IsRegular() {
		return File{}, fmt.Errorf("%s %s: not a regular file", name, path)
	}
	f, err := os.Open(abs)
	if err != nil {
		return File{}, fmt.Errorf("%s %s: %w", name, path, err)
	}
	f.Close()
	return File{Path: abs, Size: st.Size(), ModTime: st.ModTime().UnixNano()}, nil
}

func (s *Store) put(b *Base, idx *overlay.Index) error {
	id := b.ID.String()
	rec, err := json.Marshal(b)
	if err != nil {
		return err
	}
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	for _, img := range overlay.Images {
		hs := idx.Hashes[img]
		for blk := 0; blk*hashesPerBlock < len(hs); blk++ {
			part := hs[blk*hashesPerBlock : min(len(hs), (blk+1)*hashesPerBlock)]
			v := make([]byte, 0, len(part)*32)
			for _, h := range part {
				v = append(v, h[:]...)
			}
			if err := wb.Set(idxKey(id, img, blk), v); err != nil {
				return err
			}
		}
	}
	// The record goes last, so a base is never visible without its index.
	if err := wb.Flush(); err != nil {
		return err
	}
	if err := s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Set([]byte("basename/"+b.Name), []byte(id)); err != nil {
			return err
		}
		return txn.Set([]byte("base/"+id), rec)
	}); err != nil {
		return err
	}
	return s.sync()
}

func idxKey(id string, img overlay.Image, blk int) []byte {
	k := []byte("baseidx/" + id + "/" + img.String() + "/")
	return binary.BigEndian.AppendUint32(k, uint32(blk))
}

// List returns every registered base, by name.
func (s *Store) List() ([]*Base, error) {
	var out []*Base
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte("base/"), PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var b Base
			if err := it.Item().Value(func(v []byte) error { return json.Unmarshal(v, &b) }); err != nil {
				return err
			}
			out = append(out, &b)
		}
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

func (s *Store) lookupID(id string) (*Base, error) {
	var b Base
	err := s.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get([]byte("base/" + id))
		if err != nil {
			return err
		}
		return it.Value(func(v []byte) error { return json.Unmarshal(v, &b) })
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, errNotFound
	}
	return &b, err
}

func (s *Store) lookupName(name string) (*Base, error) {
	var id string
	err := s.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get([]byte("basename/" + name))
		if err != nil {
			return err
		}
		v, err := it.ValueCopy(nil)
		id = string(v)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, err
	}
	return s.lookupID(id)
}

// Resolve finds a base by name, full ID, or an unambiguous ID prefix of at
// least 6 hex digits.
func (s *Store) Resolve(ref string) (*Base, error) {
	if b, err := s.lookupName(ref); err == nil || !errors.Is(err, errNotFound) {
		return b, err
	}
	if b, err := s.lookupID(ref); err == nil || !errors.Is(err, errNotFound) {
		return b, err
	}
	if len(ref) >= 6 {
		all, err := s.List()
		if err != nil {
			return nil, err
		}
		var found []*Base
		for _, b := range all {
			if strings.HasPrefix(b.ID.String(), strings.ToLower(ref)) {
				found = append(found, b)
			}
		}
		if len(found) == 1 {
			return found[0], nil
		}
		if len(found) > 1 {
			return nil, fmt.Errorf("base %q is ambiguous: %d bases have IDs starting with it", ref, len(found))
		}
	}
	return nil, fmt.Errorf("base %q is not in the registry (see `cloudletfs base list`, or import it with `cloudletfs base import`)", ref)
}

// ErrBaseInUse says a mount or another command has a base's images open.
var ErrBaseInUse = errors.New("the base is in use")

// Remove unregisters a base and drops its index. It fails with
// ErrBaseInUse while anything has the base's images open through
// OpenImages (a mount of an overlay on it, an overlay being built). Files
// that `base create` copied into the state dir for this base (OwnedDir)
// are removed too; files anywhere else are left alone.
func (s *Store) Remove(b *Base) error {
	if err := b.lockImages(unix.LOCK_EX); errors.Is(err, unix.EWOULDBLOCK) {
		return fmt.Errorf("base %s: %w: an overlay on it is mounted, or an overlay is being built on it; unmount it (or let the build finish) first", b.Name, ErrBaseInUse)
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("base %s: %w", b.Name, err)
	}
	owned, err := s.OwnedDir(b)
	if err != nil {
		return err
	}
	id := b.ID.String()
	if err := s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Delete([]byte("base/" + id)); err != nil {
			return err
		}
		return txn.Delete([]byte("basename/" + b.Name))
	}); err != nil {
		return err
	}
	if err := s.db.DropPrefix([]byte("baseidx/" + id + "/")); err != nil {
		return err
	}
	if err := s.sync(); err != nil {
		return err
	}
	if owned != "" {
		if err := os.RemoveAll(owned); err != nil {
			return fmt.Errorf("base %s is unregistered, but its files in %s could not all be removed: %w", b.Name, owned, err)
		}
	}
	return nil
}

// OwnedDir returns the directory of the state dir that `base create` made
// for the base's files (and its kernel and initrd), or "" if the base's
// files are elsewhere: a directory base-* right under the state dir that
// holds every file of the base and no file of any other registered base.
func (s *Store) OwnedDir(b *Base) (string, error) {
	dir := filepath.Dir(b.Disk.Path)
	if !strings.HasPrefix(filepath.Base(dir), "base-") {
		return "", nil
	}
	state, err := filepath.Abs(s.dir)
	if err != nil {
		return "", err
	}
	if filepath.Dir(dir) != state {
		return "", nil
	}
	for _, f := range b.Files() {
		if filepath.Dir(f.File.Path) != dir {
			return "", nil
		}
	}
	all, err := s.List()
	if err != nil {
		return "", err
	}
	for _, o := range all {
		if o.ID == b.ID {
			continue
		}
		for _, f := range o.Files() {
			if filepath.Dir(f.File.Path) == dir {
				return "", nil
			}
		}
	}
	return dir, nil
}

// lockImages takes a flock of the given kind on the base's disk image and
// lets it go again at once; LOCK_EX fails with EWOULDBLOCK while
// OpenImages holds it shared.
func (b *Base) lockImages(how int) error {
	f, err := os.Open(b.Disk.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
}

// Index loads a base's chunk index.
func (s *Store) Index(b *Base) (*overlay.Index, error) {
	idx := &overlay.Index{ChunkSize: b.ChunkSize, Sizes: [2]int64{b.Disk.Size, b.Memory.Size}}
	err := s.db.View(func(txn *badger.Txn) error {
		for _, img := range overlay.Images {
			n := int((idx.Sizes[img] + int64(b.ChunkSize) - 1) / int64(b.ChunkSize))
			hs := make([]overlay.Digest, 0, n)
			for blk := 0; len(hs) < n; blk++ {
				it, err := txn.Get(idxKey(b.ID.String(), img, blk))
				if err != nil {
					return fmt.Errorf("%s index block %d: %w", img, blk, err)
				}
				if err := it.Value(func(v []byte) error {
					for o := 0; o+32 <= len(v); o += 32 {
						hs = append(hs, overlay.Digest(v[o:o+32]))
					}
					return nil
				}); err != nil {
					return err
				}
			}
			if len(hs) != n {
				return fmt.Errorf("%s index has %d chunks, want %d", img, len(hs), n)
			}
			idx.Hashes[img] = hs
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("base %s: index is damaged (%v): remove and re-import the base", b.Name, err)
	}
	return idx, nil
}

// CheckFiles is the cheap check made at every use: each file still exists
// with the size and modification time it had at import.
func (b *Base) CheckFiles() error {
	for _, f := range b.Files() {
		st, err := os.Stat(f.File.Path)
		if err != nil {
			return fmt.Errorf("base %s: %s %s: %w", b.Name, f.Name, f.File.Path, err)
		}
		if st.Size() != f.File.Size || st.ModTime().UnixNano() != f.File.ModTime {
			return fmt.Errorf("base %s: %s %s changed since import (size or modification time differs): run `cloudletfs base verify %s`, or re-import the base", b.Name, f.Name, f.File.Path, b.Name)
		}
	}
	return nil
}

// Verify re-hashes every file of the base and compares it with the digest
// taken at import.
func (b *Base) Verify(progress func(n, total int64)) error {
	_, err := b.verify(context.Background(), progress)
	return err
}

// Verify re-hashes every file of the base and compares it with the digest
// taken at import. When every file is intact but some size or
// modification time differs from the record (a `touch`, a copy that kept
// the bytes), the registry takes the new ones, so that the base passes the
// cheap check at every use again; refreshed says so.
func (s *Store) Verify(b *Base, progress func(n, total int64)) (refreshed bool, err error) {
	return s.VerifyContext(context.Background(), b, progress)
}

// VerifyContext is Verify that stops, recording nothing, once ctx ends.
func (s *Store) VerifyContext(ctx context.Context, b *Base, progress func(n, total int64)) (refreshed bool, err error) {
	seen, err := b.verify(ctx, progress)
	if err != nil {
		return false, err
	}
	nb := *b
	files := []*File{&nb.Disk, &nb.Memory, &nb.State}
	if b.VMConfig != nil {
		vc := *b.VMConfig
		nb.VMConfig = &vc
		files = append(files, nb.VMConfig)
	}
	for i, f := range files {
		if seen[i].Size != f.Size || seen[i].ModTime != f.ModTime {
			refreshed = true
			f.Size, f.ModTime = seen[i].Size, seen[i].ModTime
		}
	}
	if !refreshed {
		return false, nil
	}
	rec, err := json.Marshal(&nb)
	if err != nil {
		return false, err
	}
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set([]byte("base/"+b.ID.String()), rec) }); err != nil {
		return false, fmt.Errorf("base %s: recording the new size and modification time: %w", b.Name, err)
	}
	if err := s.sync(); err != nil {
		return false, err
	}
	*b = nb
	return true, nil
}

// verify hashes the base's files and returns the size and modification
// time each had while it was hashed. A file that changed while it was
// being hashed counts as changed.
func (b *Base) verify(ctx context.Context, progress func(n, total int64)) ([]File, error) {
	var total int64
	for _, f := range b.Files() {
		total += f.File.Size
	}
	var bad []string
	var seen []File
	for _, f := range b.Files() {
		fh, err := os.Open(f.File.Path)
		if err != nil {
			return nil, fmt.Errorf("base %s: %s: %w", b.Name, f.Name, err)
		}
		before, err := fstat(fh)
		if err != nil {
			fh.Close()
			return nil, err
		}
		h := sha256.New()
		_, err = io.Copy(io.MultiWriter(h, progressWriter(func(n int64) {
			if progress != nil {
				progress(n, total)
			}
		})), io.NewSectionReader(ctxReader{ctx, fh}, 0, math.MaxInt64))
		sum := overlay.Digest(h.Sum(nil))
		after, serr := fstat(fh)
		fh.Close()
		if err == nil {
			err = serr
		}
		if err != nil {
			return nil, fmt.Errorf("base %s: %s %s: %w", b.Name, f.Name, f.File.Path, err)
		}
		if sum != f.File.SHA || before != after || after.size != f.File.Size {
			bad = append(bad, fmt.Sprintf("%s %s", f.Name, f.File.Path))
		}
		seen = append(seen, File{Path: f.File.Path, Size: after.size, ModTime: after.mtime, SHA: sum})
	}
	if len(bad) > 0 {
		return nil, fmt.Errorf("base %s: content changed since import: %s", b.Name, strings.Join(bad, ", "))
	}
	return seen, nil
}

// Open checks the base's files cheaply and opens them, with the chunk
// index, for building overlays. Close the returned closer when done.
func (s *Store) Open(b *Base) (*overlay.Base, func(), error) {
	if err := b.CheckFiles(); err != nil {
		return nil, nil, err
	}
	idx, err := s.Index(b)
	if err != nil {
		return nil, nil, err
	}
	ob, closer, err := OpenImages(b)
	if err != nil {
		return nil, nil, err
	}
	ob.Index = idx
	return ob, closer, nil
}

// OpenImages checks the base's files cheaply and opens its images without
// the chunk index, for reading an overlay's base references: a mount does
// not carry 8 bytes of index per KiB of base.
//
// The images read only what the base held at import: a read fails, rather
// than return other bytes or zeros, once an image's size, modification
// time or change time differs from when it was opened (checked before and
// after each read), and it is opened only if its size and modification
// time are those the registry recorded. Until the closer runs, the disk
// image holds a shared flock that makes Remove refuse the base.
func OpenImages(b *Base) (_ *overlay.Base, closer func(), err error) {
	if err := b.CheckFiles(); err != nil {
		return nil, nil, err
	}
	var imgs [2]*checkedFile
	closer = func() {
		for _, f := range imgs {
			if f != nil {
				f.f.Close()
			}
		}
	}
	defer func() {
		if err != nil {
			closer()
		}
	}()
	for i, f := range []struct {
		name string
		file File
	}{{"disk", b.Disk}, {"memory", b.Memory}} {
		if imgs[i], err = openChecked(b, f.name, f.file); err != nil {
			return nil, nil, err
		}
	}
	if err := unix.Flock(int(imgs[0].f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err != nil {
		return nil, nil, fmt.Errorf("base %s: locking %s: %w", b.Name, b.Disk.Path, err)
	}
	// The index without its hashes: the sizes that references are checked
	// against.
	idx := &overlay.Index{ChunkSize: b.ChunkSize, Sizes: [2]int64{b.Disk.Size, b.Memory.Size}}
	ob := &overlay.Base{ID: b.ID, Images: [2]io.ReaderAt{imgs[0], imgs[1]}, Index: idx}
	return ob, closer, nil
}

// fileStat is what tells that a file changed: its size, modification
// time and change time, which no one can set back.
type fileStat struct {
	size, mtime, ctime int64
}

func fstat(f *os.File) (fileStat, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fileStat{}, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	return fileStat{size: st.Size, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}, nil
}

// checkedFile is an image of a base that fails reads once it changed.
type checkedFile struct {
	f          *os.File
	base, name string
	was        fileStat
}

func openChecked(b *Base, name string, rec File) (*checkedFile, error) {
	f, err := os.Open(rec.Path)
	if err != nil {
		return nil, fmt.Errorf("base %s: %s: %w", b.Name, name, err)
	}
	c := &checkedFile{f: f, base: b.Name, name: name}
	if c.was, err = fstat(f); err == nil && (c.was.size != rec.Size || c.was.mtime != rec.ModTime) {
		err = c.changed()
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return c, nil
}

func (c *checkedFile) changed() error {
	return fmt.Errorf("base %s: %s %s changed while in use (its size, modification time or change time differs from when it was opened): reads of it fail, so that nothing reads other bytes than the base held; unmount, then run `cloudletfs base verify %s`, or re-import the base",
		c.base, c.name, c.f.Name(), c.base)
}

func (c *checkedFile) check() error {
	now, err := fstat(c.f)
	if err != nil {
		return err
	}
	if now != c.was {
		return c.changed()
	}
	return nil
}

// ReadAt reads from the image, checking it before and after the read.
func (c *checkedFile) ReadAt(p []byte, off int64) (int, error) {
	if err := c.check(); err != nil {
		return 0, err
	}
	n, err := c.f.ReadAt(p, off)
	if cerr := c.check(); cerr != nil {
		return 0, cerr
	}
	return n, err
}

// ctxReader fails every read once ctx has ended, so that hashing a large
// file stops at the next block.
type ctxReader struct {
	ctx context.Context
	r   io.ReaderAt
}

func (r ctxReader) ReadAt(p []byte, off int64) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.ReadAt(p, off)
}

// progressWriter reports the length of every write.
type progressWriter func(int64)

func (p progressWriter) Write(b []byte) (int, error) {
	p(int64(len(b)))
	return len(b), nil
}
