package main

import (
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress shows a bar on stderr when stderr is a terminal, and nothing
// otherwise, so logs and CI output stay clean.
type progress struct {
	out   io.Writer
	bar   *progressbar.ProgressBar
	phase string
}

func newProgress(w io.Writer) *progress {
	if f, ok := w.(*os.File); !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return &progress{out: w}
}

// add records n more bytes done of total in phase, starting a new bar when
// the phase changes. It is safe on a nil *progress.
func (p *progress) add(phase string, n, total int64) {
	if p == nil {
		return
	}
	if p.bar == nil || p.phase != phase {
		p.done()
		p.phase = phase
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(p.out),
			progressbar.OptionSetDescription(phase),
			progressbar.OptionShowBytes(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish())
	}
	p.bar.Add64(n)
}

// done removes the bar.
func (p *progress) done() {
	if p == nil || p.bar == nil {
		return
	}
	p.bar.Finish()
	p.bar = nil
}
