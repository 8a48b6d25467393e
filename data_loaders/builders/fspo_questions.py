"""The question bank of the FSPO synthetic users: 65 questions over 31 topics, each with three key
points and one example (hand-written, so a template can answer it in any style)."""

from __future__ import annotations

# (topic, question, three key points, an example)
QUESTIONS: tuple[tuple[str, str, tuple[str, str, str], str], ...] = (
    (
        "cooking",
        "How do I cook rice on the stove?",
        (
            "Rinse the rice until the water runs clear",
            "Use about one and a half cups of water per cup of rice",
            "Simmer it covered on low heat for fifteen minutes",
        ),
        "jasmine rice needs a little less water than brown rice",
    ),
    (
        "cooking",
        "How can I make a soup taste richer?",
        (
            "Brown the vegetables before adding liquid",
            "Use a good stock instead of plain water",
            "Finish it with a splash of acid such as lemon juice",
        ),
        "a spoon of miso deepens a vegetable soup",
    ),
    (
        "baking",
        "Why did my bread come out dense?",
        (
            "The dough may not have risen long enough",
            "The yeast may have been old or killed by hot water",
            "Too much flour makes a stiff dough",
        ),
        "a dough left to rise overnight in the fridge is usually lighter",
    ),
    (
        "fitness",
        "How should I start running?",
        (
            "Begin with short runs mixed with walking",
            "Increase your weekly distance slowly",
            "Wear shoes that fit your stride",
        ),
        "run one minute and walk two minutes, ten times",
    ),
    (
        "fitness",
        "How do I build strength at home?",
        (
            "Use bodyweight moves such as squats and push-ups",
            "Add repetitions or slow the movement as you improve",
            "Rest a day between hard sessions",
        ),
        "three sets of ten squats every other day",
    ),
    (
        "sleep",
        "How can I fall asleep faster?",
        ("Keep a regular bedtime", "Avoid screens for an hour before bed", "Keep the bedroom cool and dark"),
        "reading a paper book instead of scrolling",
    ),
    (
        "nutrition",
        "How much water should I drink a day?",
        (
            "Most adults need around two litres from all sources",
            "Drink more when it is hot or you exercise",
            "Pale urine is a simple sign you are drinking enough",
        ),
        "a glass of water with every meal",
    ),
    (
        "nutrition",
        "Is breakfast really important?",
        (
            "It depends more on your total diet than on timing",
            "A protein-rich breakfast can reduce snacking",
            "Skipping it is fine if you eat well later",
        ),
        "eggs and fruit keep many people full until lunch",
    ),
    (
        "finance",
        "How do I start a budget?",
        (
            "Write down your income and fixed costs",
            "Track your spending for a month",
            "Set limits for each category and review them",
        ),
        "the fifty thirty twenty rule for needs, wants and savings",
    ),
    (
        "finance",
        "Should I pay off debt or save first?",
        (
            "Keep a small emergency fund first",
            "Then pay off high-interest debt quickly",
            "Save more once the costly debt is gone",
        ),
        "a credit card at twenty percent costs more than savings earn",
    ),
    (
        "finance",
        "What is an index fund?",
        (
            "It is a fund that tracks a whole market index",
            "Its fees are usually low",
            "It spreads your money over many companies",
        ),
        "a fund that holds all five hundred companies of the S&P 500",
    ),
    (
        "career",
        "How do I prepare for a job interview?",
        (
            "Research the company and the role",
            "Prepare stories that show your skills",
            "Have questions ready for the interviewer",
        ),
        "a story about a project you rescued under a deadline",
    ),
    (
        "career",
        "How do I ask for a raise?",
        (
            "Collect evidence of your results",
            "Know the market rate for your role",
            "Pick a calm moment and ask directly",
        ),
        "showing that your work saved the team ten hours a week",
    ),
    (
        "career",
        "How can I write a better resume?",
        ("Lead with results rather than duties", "Keep it to one or two pages", "Tailor it to each job posting"),
        "writing cut costs by ten percent instead of managed costs",
    ),
    (
        "programming",
        "How do I learn to code?",
        ("Pick one language and stick with it", "Build small projects that interest you", "Read other people's code"),
        "a script that renames your holiday photos",
    ),
    (
        "programming",
        "What is version control?",
        (
            "It records every change to your files",
            "It lets you return to any earlier state",
            "It helps many people work on the same code",
        ),
        "Git keeps a history of each commit",
    ),
    (
        "programming",
        "How do I debug a program?",
        ("Reproduce the bug reliably", "Narrow down where the behaviour goes wrong", "Test one hypothesis at a time"),
        "printing a variable before and after a suspicious line",
    ),
    (
        "programming",
        "What is an API?",
        (
            "It is a defined way for programs to talk to each other",
            "It hides how the other side works",
            "It lists the requests you can make and what comes back",
        ),
        "a weather service that returns the forecast for a city",
    ),
    (
        "science",
        "Why is the sky blue?",
        (
            "Sunlight contains all colours",
            "Air molecules scatter short blue wavelengths most",
            "So blue light reaches our eyes from every direction",
        ),
        "sunsets look red because the light passes through more air",
    ),
    (
        "science",
        "How do vaccines work?",
        (
            "They show the immune system a harmless piece of a germ",
            "The body learns to make antibodies against it",
            "Later infections are fought off faster",
        ),
        "the measles vaccine gives protection for decades",
    ),
    (
        "science",
        "What causes the seasons?",
        (
            "The Earth's axis is tilted",
            "Each hemisphere leans toward the sun for part of the year",
            "More direct sunlight means warmer days",
        ),
        "June is summer in Europe but winter in Australia",
    ),
    (
        "science",
        "What is a black hole?",
        (
            "It is a region where gravity is so strong that light cannot escape",
            "It forms when a massive star collapses",
            "Its boundary is called the event horizon",
        ),
        "the black hole at the centre of our galaxy",
    ),
    (
        "history",
        "Why did the Roman Empire fall?",
        (
            "Its economy weakened under heavy costs",
            "Its politics were unstable",
            "Outside groups pressed on its borders",
        ),
        "the sack of Rome in the year 410",
    ),
    (
        "history",
        "What was the Industrial Revolution?",
        (
            "It was a shift from hand work to machines",
            "It began in Britain in the eighteenth century",
            "It changed where and how people lived",
        ),
        "steam engines powering textile mills",
    ),
    (
        "history",
        "Why was the printing press important?",
        ("It made books much cheaper", "Ideas spread faster and wider", "It helped more people learn to read"),
        "Gutenberg's Bible printed around 1455",
    ),
    (
        "travel",
        "How do I pack light for a trip?",
        (
            "Choose clothes that mix and match",
            "Plan to wash clothes on the way",
            "Leave behind anything you might need only once",
        ),
        "three shirts and two trousers for a week",
    ),
    (
        "travel",
        "How can I deal with jet lag?",
        (
            "Shift your sleep an hour a day before leaving",
            "Get daylight at your destination in the morning",
            "Avoid long naps on arrival",
        ),
        "a walk outside on your first morning abroad",
    ),
    (
        "travel",
        "How do I find cheap flights?",
        ("Be flexible with your dates", "Compare prices on several sites", "Book a few weeks ahead"),
        "flying on a Tuesday instead of a Friday",
    ),
    (
        "gardening",
        "How often should I water houseplants?",
        (
            "Water when the top of the soil is dry",
            "Most plants need less water in winter",
            "Make sure the pot drains well",
        ),
        "a cactus may need water only once a month",
    ),
    (
        "gardening",
        "How do I grow tomatoes?",
        (
            "Give them at least six hours of sun",
            "Water them deeply and regularly",
            "Support the stems with stakes or cages",
        ),
        "cherry tomatoes are the easiest to start with",
    ),
    (
        "pets",
        "How do I house-train a puppy?",
        (
            "Take it outside often, especially after meals",
            "Praise it right after it goes outside",
            "Keep a steady daily routine",
        ),
        "a trip outside every two hours at first",
    ),
    (
        "pets",
        "Why does my cat scratch furniture?",
        (
            "Scratching keeps its claws healthy",
            "It marks territory with scent",
            "A scratching post gives it a better outlet",
        ),
        "a tall post placed next to the sofa",
    ),
    (
        "language",
        "How can I learn a new language faster?",
        ("Practise a little every day", "Speak with native speakers early", "Learn the most common words first"),
        "ten minutes of flashcards each morning",
    ),
    (
        "language",
        "What is the difference between affect and effect?",
        ("Affect is usually a verb", "Effect is usually a noun", "To effect change means to bring it about"),
        "the rain affected the game and had a big effect",
    ),
    (
        "writing",
        "How do I write a clear email?",
        ("Put the main point in the first line", "Keep paragraphs short", "End with the action you need"),
        "a subject line that says exactly what you need",
    ),
    (
        "writing",
        "How can I overcome writer's block?",
        ("Write badly first and edit later", "Set a small daily word goal", "Change where you write"),
        "writing two hundred words before breakfast",
    ),
    (
        "productivity",
        "How do I stop procrastinating?",
        ("Break the task into tiny steps", "Start with just five minutes", "Remove distractions before you begin"),
        "putting your phone in another room",
    ),
    (
        "productivity",
        "How should I plan my week?",
        ("List your most important goals", "Block time for them in your calendar", "Review the plan each evening"),
        "reserving Monday mornings for deep work",
    ),
    (
        "health",
        "How can I reduce stress?",
        ("Move your body every day", "Talk to people you trust", "Make time for rest"),
        "a short walk after lunch",
    ),
    (
        "health",
        "How do I improve my posture?",
        ("Set your screen at eye level", "Take breaks to stand and stretch", "Strengthen your back and core"),
        "a stretch every half hour at your desk",
    ),
    (
        "health",
        "How can I eat more vegetables?",
        (
            "Add them to dishes you already like",
            "Keep cut vegetables ready in the fridge",
            "Try one new vegetable each week",
        ),
        "spinach stirred into pasta sauce",
    ),
    (
        "home",
        "How do I remove a coffee stain?",
        ("Blot it quickly with cold water", "Treat it with a little dish soap", "Wash it before the stain sets"),
        "soaking a shirt in cold water for half an hour",
    ),
    (
        "home",
        "How do I save energy at home?",
        ("Switch to efficient light bulbs", "Seal gaps around doors and windows", "Turn the heating down a degree"),
        "LED bulbs use far less power than old bulbs",
    ),
    (
        "home",
        "How do I fix a squeaky door?",
        ("Find which hinge squeaks", "Apply a little oil to the hinge pin", "Open and close the door to spread it"),
        "a drop of olive oil in an emergency",
    ),
    (
        "music",
        "How do I start learning guitar?",
        ("Learn a few basic chords", "Practise switching between them slowly", "Play songs you enjoy"),
        "the chords G, C and D cover many songs",
    ),
    (
        "music",
        "How can I improve my singing?",
        ("Warm up your voice first", "Breathe from your diaphragm", "Record yourself and listen back"),
        "humming scales for five minutes",
    ),
    (
        "art",
        "How do I get better at drawing?",
        ("Draw a little every day", "Study simple shapes and shading", "Copy works you admire"),
        "sketching your coffee cup each morning",
    ),
    (
        "photography",
        "How do I take better photos with my phone?",
        ("Use natural light", "Follow the rule of thirds", "Keep the lens clean"),
        "placing the horizon on the lower third line",
    ),
    (
        "environment",
        "How can I reduce my plastic use?",
        ("Carry a reusable bag and bottle", "Buy food with less packaging", "Choose refills when you can"),
        "a cloth bag kept in your backpack",
    ),
    (
        "environment",
        "Why is recycling important?",
        ("It saves raw materials", "It uses less energy than making new goods", "It keeps waste out of landfills"),
        "recycled aluminium needs far less energy than new aluminium",
    ),
    (
        "parenting",
        "How do I get my child to read more?",
        ("Read together every day", "Let them choose their books", "Keep books easy to reach"),
        "a bedtime story every night",
    ),
    (
        "parenting",
        "How should I handle tantrums?",
        ("Stay calm yourself", "Name the feeling your child has", "Keep rules consistent"),
        "saying you are angry because we have to leave the park",
    ),
    (
        "relationships",
        "How do I make new friends as an adult?",
        ("Join groups around your interests", "Say yes to invitations", "Follow up after you meet someone"),
        "a weekly board game night",
    ),
    (
        "relationships",
        "How can I be a better listener?",
        ("Give the speaker your full attention", "Ask open questions", "Repeat back what you heard"),
        "asking what happened next instead of giving advice",
    ),
    (
        "technology",
        "How do I make a strong password?",
        ("Use a long passphrase", "Never reuse passwords", "Use a password manager"),
        "four random words joined together",
    ),
    (
        "technology",
        "How can I speed up my computer?",
        ("Close programs you are not using", "Remove apps that start with the system", "Free up disk space"),
        "uninstalling old games you no longer play",
    ),
    (
        "technology",
        "What is cloud storage?",
        (
            "It keeps your files on remote servers",
            "You can reach them from any device",
            "It can back up your data automatically",
        ),
        "photos from your phone saved to an online drive",
    ),
    (
        "math",
        "How do I calculate a percentage?",
        ("Divide the part by the whole", "Multiply the result by one hundred", "Check that the answer makes sense"),
        "twenty out of eighty is twenty five percent",
    ),
    (
        "math",
        "What is compound interest?",
        (
            "It is interest earned on earlier interest",
            "Your balance grows faster over time",
            "Starting early makes a big difference",
        ),
        "a hundred dollars at ten percent becomes about two hundred and sixty in ten years",
    ),
    (
        "economics",
        "What causes inflation?",
        (
            "Demand can grow faster than supply",
            "Rising costs can push prices up",
            "More money in circulation can lower its value",
        ),
        "prices rising after a shortage of a key good",
    ),
    (
        "law",
        "What is a contract?",
        (
            "It is an agreement the law will enforce",
            "It needs an offer and an acceptance",
            "Both sides must give something of value",
        ),
        "a lease between a tenant and a landlord",
    ),
    (
        "cars",
        "How often should I change my car's oil?",
        (
            "Follow the interval in your owner's manual",
            "Many modern cars go ten thousand kilometres or more",
            "Change it sooner if you drive in harsh conditions",
        ),
        "short trips in cold weather wear oil faster",
    ),
    (
        "cars",
        "How do I drive more fuel-efficiently?",
        ("Accelerate smoothly", "Keep a steady speed", "Check your tyre pressure"),
        "using cruise control on the highway",
    ),
    (
        "sports",
        "How do I improve my swimming?",
        ("Work on your breathing rhythm", "Keep your body flat in the water", "Practise drills for each stroke"),
        "breathing every third stroke in freestyle",
    ),
    (
        "education",
        "How do I study for exams?",
        ("Space your study over several days", "Test yourself instead of rereading", "Sleep well before the exam"),
        "flashcards reviewed on days one, three and seven",
    ),
)
