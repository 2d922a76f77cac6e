package order

import (
	"fmt"
	"io"
	"math"
)

// Plot draws a replay as an SVG timeline: one row per segment with its
// transfer (blue for the stream, orange for demand, grey if cancelled), and
// below them the accesses, each a tick at the time it was served with a red
// bar for the time it stalled.
func Plot(w io.Writer, r Result, title string) error {
	end := r.Ready
	for _, f := range r.Fetches {
		end = max(end, f.Ready)
	}
	for _, s := range r.Served {
		end = max(end, s)
	}
	if r.FirstResponse > 0 {
		end = max(end, r.FirstResponse)
	}
	end = math.Max(end*1.05, 0.001)
	const width, left, rowH = 1000.0, 60.0, 6.0
	nseg := 0
	for _, f := range r.Fetches {
		nseg = max(nseg, f.Segment+1)
	}
	height := 60 + float64(nseg)*rowH + 80
	x := func(t float64) float64 { return left + (width-left-20)*t/end }
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="11">`+"\n", width, height)
	fmt.Fprintf(w, `<text x="%.0f" y="16" font-size="13">%s</text>`+"\n", left, escape(title))
	axisY := height - 20
	fmt.Fprintf(w, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x(0), axisY, x(end), axisY)
	step := niceStep(end)
	for t := 0.0; t <= end; t += step {
		fmt.Fprintf(w, `<text x="%.1f" y="%.1f" text-anchor="middle">%gs</text>`+"\n", x(t), axisY+14, math.Round(t*1000)/1000)
	}
	fmt.Fprintf(w, `<line x1="%.1f" y1="24" x2="%.1f" y2="%.1f" stroke="green" stroke-dasharray="4"/><text x="%.1f" y="34" fill="green">ready</text>`+"\n", x(r.Ready), x(r.Ready), axisY, x(r.Ready)+3)
	if r.FirstResponse > 0 {
		fmt.Fprintf(w, `<line x1="%.1f" y1="24" x2="%.1f" y2="%.1f" stroke="purple" stroke-dasharray="4"/><text x="%.1f" y="46" fill="purple" text-anchor="end">first response %.2fs</text>`+"\n", x(r.FirstResponse), x(r.FirstResponse), axisY, x(r.FirstResponse)-3, r.FirstResponse)
	}
	fmt.Fprintf(w, `<text x="4" y="60">segments</text>`+"\n")
	for _, f := range r.Fetches {
		color := "#3b7dd8"
		if f.Demand {
			color = "#e8871e"
		}
		if f.Cancelled {
			color = "#bbbbbb"
		}
		y := 54 + float64(f.Segment)*rowH
		fmt.Fprintf(w, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", x(f.Start), y, math.Max(1, x(f.End)-x(f.Start)), rowH-1, color)
	}
	accY := 60 + float64(nseg)*rowH + 20
	fmt.Fprintf(w, `<text x="4" y="%.1f">accesses</text>`+"\n", accY+4)
	for i := range r.Served {
		if st := r.Served[i] - r.Issued[i]; st > 0 {
			fmt.Fprintf(w, `<rect x="%.1f" y="%.1f" width="%.1f" height="10" fill="red" opacity="0.5"/>`+"\n", x(r.Issued[i]), accY-5, math.Max(1, x(r.Served[i])-x(r.Issued[i])))
		}
		fmt.Fprintf(w, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black" stroke-width="0.5"/>`+"\n", x(r.Served[i]), accY-6, x(r.Served[i]), accY+6)
	}
	_, err := fmt.Fprintln(w, "</svg>")
	return err
}

func niceStep(end float64) float64 {
	raw := end / 10
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func escape(s string) string {
	out := ""
	for _, r := range s {
		switch r {
		case '<':
			out += "&lt;"
		case '>':
			out += "&gt;"
		case '&':
			out += "&amp;"
		default:
			out += string(r)
		}
	}
	return out
}
