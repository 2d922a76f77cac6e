package overlay

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Every file the project writes for the user follows the same rules:
//   - it is written beside its final name and renamed into place only when
//     complete, so a failure or an interruption leaves nothing behind;
//   - it is created 0666 less the umask, as cp or tar would create it: an
//     overlay is meant to be published, and a web server must be able to
//     read it;
//   - the directories above it are created when missing, and removed again
//     if the write fails;
//   - errors name the file the user asked for, never a temporary one.

const (
	// tempMark sits between a final name and the random suffix of the
	// temporary file written beside it.
	tempMark = ".tmp-"
	// segmentsSuffix names the second temporary file of Build, which holds
	// the segments until the manifest before them is written.
	segmentsSuffix = ".segments"
	// scratchMark begins the name of a scratch directory beside an output,
	// such as the one Reorder decodes its input into.
	scratchMark = ".reorder-"
)

// tempFile creates a hidden temporary file beside final, so that a rename
// replaces final atomically and a crash leaves at most a dot-file behind.
// It is created with mode 0666, so the umask decides, unlike
// os.CreateTemp's 0600.
func tempFile(final string) (*os.File, error) {
	dir, base := filepath.Split(final)
	for {
		name := filepath.Join(dir, "."+base+tempMark+strconv.FormatUint(rand.Uint64(), 36))
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o666)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return nil, hideTemp(err)
		}
		return f, nil
	}
}

// commit makes f durable and moves it to final.
func commit(f *os.File, final string) error {
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), final)
}

// syncDir makes renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// discard closes and removes a temporary file that will not be committed.
func discard(f *os.File) {
	f.Close()
	os.Remove(f.Name())
}

// mkdirs creates dir and any missing parents, and returns a function that
// removes what it created, for a write that failed.
func mkdirs(dir string) (undo func(), err error) {
	var missing []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil || !errors.Is(err, fs.ErrNotExist) {
			break
		}
		missing = append(missing, d)
		if d == filepath.Dir(d) {
			break
		}
	}
	undo = func() {
		// Deepest first; os.Remove leaves a directory that something else
		// has written into since.
		for _, d := range missing {
			os.Remove(d)
		}
	}
	if err := os.MkdirAll(dir, 0o777); err != nil {
		undo()
		return nil, err
	}
	return undo, nil
}

// hideTemp rewrites an error about a temporary file written beside a final
// name (see tempFile) or inside a scratch directory (see scratchMark) so that
// it names the final file, or the directory that holds the scratch space.
// The error still unwraps to the original.
func hideTemp(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	var le *os.LinkError
	if errors.As(err, &le) {
		msg = strings.Replace(msg, le.Error(), (&os.PathError{Op: le.Op, Path: le.New, Err: le.Err}).Error(), 1)
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		if shown := publicPath(pe.Path); shown != pe.Path {
			msg = strings.Replace(msg, pe.Path, shown, 1)
		}
	}
	if msg == err.Error() {
		return err
	}
	return &shownError{msg, err}
}

// publicPath is the path a user knows for p: the final name of a temporary
// file, the directory a scratch directory sits in, or p itself.
func publicPath(p string) string {
	dir, base := filepath.Split(p)
	for d := filepath.Clean(dir); d != filepath.Dir(d); d = filepath.Dir(d) {
		if strings.HasPrefix(filepath.Base(d), scratchMark) {
			return filepath.Dir(d)
		}
	}
	if i := strings.LastIndex(base, tempMark); strings.HasPrefix(base, ".") && i > 0 {
		return filepath.Join(dir, strings.TrimSuffix(base[1:i], segmentsSuffix))
	}
	return p
}

// shownError is an error with its message rewritten.
type shownError struct {
	msg string
	err error
}

func (e *shownError) Error() string { return e.msg }
func (e *shownError) Unwrap() error { return e.err }

// WriteFile writes the file path by the rules above: write is given the
// temporary file, and a cancelled ctx fails the write at its next call.
func WriteFile(ctx context.Context, path string, write func(io.Writer) error) (err error) {
	undo, err := mkdirs(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			undo()
		}
	}()
	f, err := tempFile(path)
	if err != nil {
		return err
	}
	if err := write(ctxWriter{ctx, f}); err != nil {
		discard(f)
		return hideTemp(err)
	}
	if err := commit(f, path); err != nil {
		os.Remove(f.Name())
		return hideTemp(err)
	}
	return nil
}

// ctxWriter fails writes once ctx is done.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}

// ctxReaderAt fails reads once ctx is done, so that a long pass over an
// image stops soon after it is interrupted.
type ctxReaderAt struct {
	ctx context.Context
	r   io.ReaderAt
}

func (c ctxReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.ReadAt(p, off)
}
